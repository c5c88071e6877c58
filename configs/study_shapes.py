"""The whole study on the shapes world, on the paper's six model families trained here (no download, CPU).

  python -m experiments.study --config=configs/study_shapes.py --workdir=runs/shapes
Models: CLIP (InfoNCE) and SigLIP2 (sigmoid loss), contrastive; Qwen2-VL, Qwen3-VL, PaliGemma and
Chameleon (its VQ image tokenizer trained first), generative, trained as generalists on the mixture
of `config.encoder_training.mixture` (sae_jax/study/trainers/).
Cost: 51 min 42 s wall in one command on 2 quiet cores, peak RSS 5.4 GiB (5,837 s of per-model steps,
experiments/results/shapes/report.md "Wall time per step", two models at a time: study.workers=2).
Arg words: "tiny" (400 train / 100 test images, all six families; tests/test_study.py).
"""

from configs import study_common, study_paper
from sae_jax import config_utils

MODELS = ("clip", "siglip", "qwen2_vl", "qwen3_vl", "paligemma", "chameleon")
GENERATIVE = ("qwen2_vl", "qwen3_vl", "paligemma", "chameleon")
# Each family's model in the paper (configs/study_paper.py): its published numbers print beside ours.
PAPER_MODEL = {
  "clip": "clip",
  "siglip": "siglip2",
  "qwen2_vl": "qwen2vl",
  "qwen3_vl": "qwen3vl",
  "paligemma": "paligemma2",
  "chameleon": "chameleon",
}


def get_config(arg: str = ""):
  words = config_utils.parse_arg(arg, ("tiny",), "configs/study_shapes.py")
  config = study_common.get_config()
  config.extract.log_every_s = 30.0
  config.data.prefetch = 2
  config.study.models = MODELS
  paper = study_paper.published()
  for name in MODELS:
    config.study.published[name] = paper[PAPER_MODEL[name]]
  # The paper's regime at miniature scale (issue 20): 1,000 test images x 5 captions; every SAE has
  # c=2048 (top-1% sets of 20 concepts) and trains on the pooled rows of all 35,000 train images
  # (one image row + 5 caption rows each: 210,000 rows).
  config.shapes.train_images = 35000
  config.study.train_extract_images = 0
  config.study.sae_steps = 1000
  config.study.sae_batch_size = 1024
  config.study.workers = 2  # two models at a time, one torch thread each (2 cores)
  # The "modern" SAE (Gao et al.: pre-bias at the rows' geometric median, tied init, normalised MSE,
  # AuxK on latents silent for 100k rows, ~100 steps). A decoder's pooled rows sit close to one large
  # common vector; without a pre-bias the paper preset spends latents on it (measured on the tiny
  # study's Qwen2-VL rows: held-out FVU 9.06 paper, 0.21 paper + mean pre-bias, 0.056 modern).
  config.sae.preset = "modern"
  config.sae.dead_tokens = 100_000
  # k=32: with k=16, 41% of CLIP's 2048 concepts never fired on the 6,000 test rows (eval FVU 0.016);
  # with k=32, 5.5% (FVU 0.010). A lower AuxK threshold (5k rows) did not help (72%).
  for name in MODELS:
    config.study.model[name].c = 2048
    config.study.model[name].k = 32
    config.study.model[name].batch_size = 64
  # Each model's steps in seconds, summed from a run of this preset (two models at a time on 2 cores):
  # the workers start the longest first.
  cost = {"clip": 660, "siglip": 1081, "qwen2_vl": 865, "qwen3_vl": 1074, "paligemma": 951, "chameleon": 1207}
  for name in MODELS:
    config.study.model[name].cost_s = float(cost[name])
  if "tiny" in words:
    config.preset_note = (
      "tiny preset: six small models trained for seconds on 400 images; it tests the plumbing, not the "
      "quality: its numbers are not results"
    )
    config.shapes.train_images = 400
    config.shapes.test_images = 100
    et = config.encoder_training
    et.eval_images = 100
    et.warmup_steps = 10
    et.log_every_s = 10.0
    et.generative.sample_captions = 1
    et.generative.eval_batches = 1
    et.generative.vision_steps = 20
    et.generative.vision_batch_size = 32
    for name in ("clip", "siglip"):
      et[name].steps = 120
      et[name].batch_size = 64
      et[name].lr = 2e-3
      et[name].hidden = 32
    et.clip.projection_dim = 32
    for name in GENERATIVE:
      g = et[name]
      g.steps = 30
      g.batch_size = 12
      g.hidden = 32
      if "vision_dim" in g:
        g.vision_dim = 32
        g.vision_depth = 1
    et.chameleon.vq_steps = 20
    et.chameleon.vq_batch_size = 16
    et.chameleon.vq_images = 200
    et.chameleon.vq_codes = 64
    et.chameleon.vision_steps = 20
    config.sae.dead_tokens = 10_000
    config.study.workers = 1
    st = config.study
    st.train_extract_images = 200
    st.sae_steps = 100
    st.sae_batch_size = 256
    for name in MODELS:
      st.model[name].c = 128
      st.model[name].k = 4
  return config
