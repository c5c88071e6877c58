"""The whole study on the shapes world, on two image-text models trained here (no download, CPU).

  python -m experiments.study --config=configs/study_shapes.py --workdir=runs/shapes
Cost: 16.5 min wall on 2 CPU cores shared with other jobs (data 19 s, CLIP 2000 steps 10.6 min,
Qwen2-VL 2000 steps 4.7 min, extraction + SAEs + analysis + retrieval of both ~1.5 min); the report
of that run is committed in experiments/results/shapes/.
Arg words: "tiny" (400 train / 100 test images, ~1-2 min for the whole study; tests/test_study.py).
"""

from configs import base
from sae_jax import config_utils


def get_config(arg: str = ""):
  words = config_utils.parse_arg(arg, ("tiny",), "configs/study_shapes.py")
  config = base.get_config()
  config.extract.log_every_s = 30.0
  config.data.prefetch = 2
  if "tiny" in words:
    config.preset_note = (
      "tiny preset: models and SAEs trained for seconds on 400 images; it tests the plumbing, not the "
      "quality: its numbers are not results"
    )
    config.shapes.train_images = 400
    config.shapes.test_images = 100
    et = config.encoder_training
    et.eval_images = 100
    et.warmup_steps = 10
    et.log_every_s = 10.0
    et.clip.steps = 120
    et.clip.batch_size = 64
    et.clip.lr = 2e-3
    et.clip.hidden = 32
    et.clip.projection_dim = 32
    et.qwen2_vl.steps = 30
    et.qwen2_vl.batch_size = 12
    et.qwen2_vl.hidden = 32
    et.qwen2_vl.vision_dim = 32
    et.qwen2_vl.vision_depth = 1
    et.qwen2_vl.sample_captions = 1
    st = config.study
    st.train_extract_images = 200
    st.sae_steps = 100
    st.sae_batch_size = 256
    for name in ("clip", "qwen2_vl"):
      st.model[name].c = 128
      st.model[name].k = 4
  return config
