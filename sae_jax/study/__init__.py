"""The study of the paper on a miniature world: everything that exists only for it.

The shapes world (`shapes`, `shapes_tasks`, `shapes_files`), the six model families trained on it
(`trainers/`), the one-command driver (`driver`, a table of steps over `layout`'s directories), the
study's own analysis (`analysis`) and its report (`report/`). The core of sae_jax never imports this
package (tests/helpers/layout.py checks it); the thin main is `experiments.study`.
"""
