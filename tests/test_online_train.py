"""Training with the encoder inside the input pipeline (data.source="online") resumes exactly."""

import numpy as np

from configs import qwen2vl_coco
from sae_jax.training import trainer
from tests.helpers.run_training import final_state


def _config(num_steps):
  config = qwen2vl_coco.get_config("tiny,online")
  config.train.num_steps = num_steps
  config.train.checkpoint_every = 4
  config.train.log_every = 4
  config.train.async_checkpoint = False
  config.train.tensorboard = False
  config.extract.online_buffer_batches = 3
  return config


def test_online_training_resumes_exactly(tmp_path, coco_mini):
  trainer.train_and_evaluate(_config(8), str(tmp_path / "straight"))
  trainer.train_and_evaluate(_config(4), str(tmp_path / "resumed"))
  summary = trainer.train_and_evaluate(_config(8), str(tmp_path / "resumed"))  # resumes at step 4
  assert summary["step"] == 8
  a, b = (
    final_state(str(tmp_path / "straight"), _config(8)),
    final_state(str(tmp_path / "resumed"), _config(8)),
  )
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert int(a["['step']"]) == 8 and not np.allclose(a["['params']['D']"], 0)
