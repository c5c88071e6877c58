"""The one small synthetic SAE the stage tests share (trained once per session in conftest.py)."""

from __future__ import annotations

import dataclasses

import ml_collections

from configs import synthetic


def synthetic_sae_config() -> ml_collections.ConfigDict:
  """The tiny modern preset trained long enough to recover the planted atoms (the 60-step tiny run
  does not): the analysis tests need the modality ordering of the planted kinds, the retrieval
  tests need the learned distractor atoms."""
  config = synthetic.get_config("tiny,modern")
  config.train.num_steps = 300
  config.train.checkpoint_every = 300
  config.train.log_every = 300
  config.train.tensorboard = False
  config.train.async_checkpoint = False
  config.data.batch_size = 1024
  return config


@dataclasses.dataclass(frozen=True)
class TrainedSAE:
  """A finished training workdir; tests read it and write their stage outputs elsewhere."""

  workdir: str

  def config(self) -> ml_collections.ConfigDict:
    """A fresh copy of the training config (tests change the stage fields of their copy)."""
    return synthetic_sae_config()
