"""Data sources, grain pipelines and the on-disk activation store."""
