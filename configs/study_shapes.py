"""The whole study on the shapes world, on two image-text models trained here (no download, CPU).

  python -m experiments.study --config=configs/study_shapes.py --workdir=runs/shapes
Cost on 2 shared CPU cores: data ~15 s; CLIP ~10 min; Qwen2-VL captioner ~10 min; extraction, SAEs,
analysis and retrieval ~5 min; report in experiments/results/shapes/ (the committed default run).
Arg words: "tiny" (~1 min per model, 400 train / 100 test images; what tests/test_study.py runs).
"""

from configs import base
from sae_jax import config_utils


def get_config(arg: str = ""):
  words = config_utils.parse_arg(arg, ("tiny",), "configs/study_shapes.py")
  config = base.get_config()
  config.extract.log_every_s = 30.0
  config.data.prefetch = 2
  if "tiny" in words:
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
