"""The embedded default: a Top-K SAE on the planted synthetic source (no model, no download).

  python -m experiments.train --config=configs/synthetic.py --workdir=/tmp/sae-synthetic
  # ~1-2 min on 2 CPU cores; get_config("tiny") is a 20-second variant used by the tests.
  python -m experiments.train --config=configs/synthetic.py:paper --workdir=/tmp/sae-paper

Argument: comma-separated words: "modern" (default) or "paper" picks the SAE preset, "tiny"
shrinks the run. The learning rate is 4e-3 instead of the paper's 8e-4 because this small planted
problem converges several times faster with it (figures in benchmarks/README.md); the paper's value
stays the base default for real activations.
"""

from configs import base
from sae_jax import config_utils
from sae_jax.errors import SaeJaxError


def get_config(arg: str = ""):
  words = config_utils.parse_arg(arg, ("modern", "paper", "tiny"), "configs/synthetic.py")
  if {"modern", "paper"} <= words:
    raise SaeJaxError("--config=configs/synthetic.py: pick one of 'modern' and 'paper'")
  config = base.get_config()
  config.sae.preset = "paper" if "paper" in words else "modern"
  config.optim.lr = 4e-3
  # 1% of c=256 is 3 atoms, fewer than the 4 planted distractors; 2% (6 atoms) covers their span.
  config.retrieval.removal_fraction = 0.02
  config.sae.d = config.data.synthetic.d
  config.sae.c = 256
  config.sae.k = 12
  config.data.batch_size = 1024
  config.train.num_steps = 1500
  config.train.log_every = 100
  config.train.checkpoint_every = 500
  if "tiny" in words:
    config.data.batch_size = 256
    config.train.num_steps = 60
    config.train.log_every = 20
    config.train.checkpoint_every = 20
    config.preset_note = "tiny preset: 60 steps on batches of 256; it tests the plumbing, not the quality"
  return config
