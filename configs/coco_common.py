"""Shared by the six `configs/<model>_coco.py` presets: COCO paths, SAE width, tiny switch.

Not a preset itself. `apply(config, arg, ...)` fills `config.extract`, `config.sae` and `config.data`
for one paper model; arg words: "tiny" (a local tiny random-weight model of the same family and a
small COCO-format fixture, seconds on a CPU), "karpathy" / "parquet" (other COCO layouts), "online"
(train with the encoder inside the input pipeline).

Evaluation protocol (the paper's, as in the authors' released code): the training split (COCO
train2017) is extracted into SAE training shards, the Karpathy 5k test split (5 captions per image;
`dataset_coco.json` + the val2014 images under $COCO_ROOT) into pooled embeddings of its own
(`activations/eval/`), and retrieval scores the test split: 3000 random queries (seed 42) against
the pool of their positives, ReAlign whitening as the baseline, the removal fitted on the training
split's pairs and its attribution rule compared with energy / |attribution| selection. "tiny" scores
its one fixture split (no separate test split: the removal is fitted on the scored pairs).

Data roots (environment variables, read when the preset is loaded):
  $COCO_ROOT  COCO 2017 (annotations/captions_train2017.json, train2017/, dataset_coco.json,
              COCO-Caption/data/*.parquet); default `data/coco` relative to the working directory.
  $COCO_MINI  the "tiny" fixture: a directory with `captions.json` and `images/` in the COCO val2017
              layout, e.g. the 11-image one that `python -m experiments.make_shapes --coco_mini
              --out=data/coco-mini` generates; default `data/coco-mini` relative to the working directory.
Each path is also a config field (`--config.extract.captions_json=...`, `--config.extract.image_dir=...`).
A missing file is reported as one line naming the field and these variables.
"""

import os

from sae_jax import config_utils

COCO_ROOT = os.environ.get("COCO_ROOT", "data/coco")
FIXTURE = os.environ.get("COCO_MINI") or os.path.join("data", "coco-mini")


WORDS = ("tiny", "karpathy", "parquet", "online")


def apply(config, arg, preset_file, *, model_name, tiny_family, d, c, decoder=True, batch_size=8):
  words = config_utils.parse_arg(arg, WORDS, f"configs/{os.path.basename(preset_file)}")
  ex = config.extract
  ex.model_name = model_name
  ex.dataset = "coco"
  ex.captions_json = os.path.join(COCO_ROOT, "annotations", "captions_train2017.json")
  ex.image_dir = os.path.join(COCO_ROOT, "train2017")
  ex.karpathy_json = os.path.join(COCO_ROOT, "dataset_coco.json")
  ex.karpathy_split = "train"
  ex.chat_template = tiny_family in ("qwen2_vl", "qwen3_vl")  # as the authors' Qwen-VL runs
  ex.eval_dataset = "karpathy"
  ex.eval_image_dir = COCO_ROOT  # dataset_coco.json paths are <filepath>/<filename>, e.g. val2014/...
  ex.eval_karpathy_split = "test"
  ex.eval_captions_per_image = 5
  r = config.retrieval
  r.split = "eval"
  r.fit_on = "train"
  r.subset = "random_restrict_pool"
  r.subset_seed = 42
  r.max_queries = 3000
  r.denominator = "all_queries"
  r.whitening_mode = "realign"
  r.removal_by = "attribution"
  r.removal_compare = ("energy", "abs_attribution", "negatives", "margin")
  r.select_on = "validation"  # +removal_selected and +abtt, chosen on the training split's pairs
  ex.parquet_files = os.path.join(COCO_ROOT, "COCO-Caption", "data", "*.parquet")
  if "karpathy" in words:
    ex.dataset = "karpathy"
  if "parquet" in words:
    ex.dataset = "parquet"
  ex.batch_size = batch_size
  if decoder:
    ex.pooling = ("mean", "last_token", "mean_no_image", "mean_no_prompt")
  else:
    ex.pooling = ("embed",)
    config.retrieval.variants = ("embed",)
    config.retrieval.base_variant = "embed"
    config.analysis.variant = "embed"
  config.sae.d = d
  config.sae.c = c
  config.sae.k = 50
  config.data.batch_size = 4096
  config.data.source = "online" if "online" in words else "shards"
  if "tiny" in words:
    ex.model_name = f"tiny:{tiny_family}"
    ex.captions_json = os.path.join(FIXTURE, "captions.json")
    ex.image_dir = os.path.join(FIXTURE, "images")
    ex.dataset = "coco"
    ex.eval_dataset = ""  # one 11-image split: scored, and the removal fitted on it
    ex.chat_template = False
    r.split = "train"
    r.fit_on = "eval"
    ex.batch_size = 4
    ex.chunk_size = 8
    ex.rows_per_shard = 512
    ex.num_workers = 2
    ex.log_every_s = 2.0
    config.sae.d = {"clip": 16, "siglip2": 32}.get(tiny_family, 32)
    config.sae.c = 128
    config.sae.k = 8
    config.data.batch_size = 64
    config.train.num_steps = 20
    config.train.log_every = 5
    config.train.checkpoint_every = 10
    config.preset_note = (
      "tiny preset: a random-weight model on the 11-image fixture; it tests the plumbing, not the quality "
      "(a held-out FVU above 1 is expected)"
    )
  return config
