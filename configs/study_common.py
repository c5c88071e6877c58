"""The study's config sections over `configs/base.py`: `shapes`, `encoder_training` and `study`.

Used by `configs/study_shapes.py` and `configs/study_paper.py` (and read only by `sae_jax/study/`);
the other presets start from base alone, so their runs carry none of these sections. Not a study
preset itself: `get_config()` is base plus these sections with their defaults, the default config of
`experiments.make_shapes`.
"""

import ml_collections

from configs import base


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """base's sections, then the study's, with their defaults (`arg` is unused here)."""
  del arg
  config = base.get_config()
  config.shapes = shapes_section()
  config.encoder_training = encoder_training_section()
  config.study = study_section()
  return config


def shapes_section() -> ml_collections.ConfigDict:
  """`config.shapes`: the shapes world's sizes and seed."""
  shapes = ml_collections.ConfigDict()  # sae_jax/study/shapes.py (experiments.make_shapes)
  shapes.seed = 0
  shapes.train_images = 8000
  shapes.test_images = 1000  # x 5 captions: the role of COCO's Karpathy 5k test
  shapes.image_size = 64
  shapes.max_objects = 3
  return shapes


def encoder_training_section() -> ml_collections.ConfigDict:
  """`config.encoder_training`: the study's image-text models, trained here."""
  # sae_jax/study/trainers/: the six image-text models the shapes study trains (torch, CPU).
  et = ml_collections.ConfigDict()
  et.seed = 0
  et.threads = 1  # torch threads (training, extraction); intra-op threads stall on shared cores
  et.log_every_s = 15.0  # progress line period
  et.weight_decay = 0.01
  et.warmup_steps = 100
  et.eval_images = 1000  # test images for the quality figures (first N of the split)
  # Byte-level BPE trained on the train captions and prompts (+ the model's special tokens); large
  # enough that every caption and template word is one token (tests/test_encoders.py checks).
  et.vocab_size = 1024
  # Generative models: probability of each task per training sequence (train_encoder docstring).
  et.mixture = ml_collections.ConfigDict(
    {"caption": 0.3, "image_word": 0.15, "text_word": 0.15, "text_lm": 0.2, "question": 0.2, "image_gen": 0.2}
  )  # image_gen: Chameleon only (the others draw from the rest, renormalised)
  et.generative = ml_collections.ConfigDict()
  et.generative.caption_prompt = "Describe the image:"
  # Stage 1 (Qwen, PaliGemma): the vision tower + projector aligned with the word embeddings by InfoNCE,
  # as real MLLMs start from a contrastive tower; then frozen for the generalist stage.
  et.generative.vision_steps = 300
  et.generative.vision_batch_size = 64
  et.generative.vision_lr = 1e-3
  et.generative.freeze_vision = True
  # The one-word summary: the largest object's "colour" | "shape" (measured: Qwen2-VL mean-pooled i2t R@1 8.5%
  # with colour vs 2.0% with shape at 2000 train / 200 test images; the towers see colour, hardly shape)
  et.generative.summary = "colour"
  et.generative.sample_captions = 3  # greedy captions of test images in quality.json
  et.generative.eval_batches = 4  # held-out batches per mixture task for the answer accuracy

  def _decoder(**kw):
    d = {"steps": 1500, "batch_size": 24, "lr": 2e-3, "hidden": 128, "layers": 2, "heads": 4, "kv_heads": 2}
    d.update(kw)
    return ml_collections.ConfigDict(d)

  et.clip = ml_collections.ConfigDict()
  et.clip.steps = 1000
  et.clip.batch_size = 128
  et.clip.lr = 1e-3
  et.clip.hidden = 128
  et.clip.layers = 2
  et.clip.heads = 4
  et.clip.patch_size = 16  # 64x64 images -> 16 patches (a 4x4 grid, finer than the 3x3 scene grid)
  et.clip.projection_dim = 128
  et.clip.max_text_len = 48
  et.siglip = ml_collections.ConfigDict(dict(et.clip.to_dict()))  # Siglip2Model, the sigmoid loss
  del et.siglip["projection_dim"]  # SigLIP embeds at the tower width
  et.siglip.steps = 1500  # the sigmoid loss learns slower than InfoNCE here (300 steps: R@1 24% vs 42%)
  # Qwen2-VL: 64x64 images, 8x8 patches -> 16 image tokens after the 2x2 merge.
  et.qwen2_vl = _decoder(vision_depth=2, vision_dim=64, patch_size=8)
  # Qwen3-VL: mean-pooled image->text R@1 on 1000 test images 0.8% at 1500 steps, 0.9% at 3000 (Qwen2-VL
  # 1.9% at 1500): steps are not what holds it back (the committed study ran 3000). train_deepstack: its
  # DeepStack mergers train in stage 2 (stage 1 aligns only the main merger; frozen, they add fixed
  # random projections to the decoder's first layer). 2000 train / 200 test images, 1500 steps:
  # i2t R@1 4.5% frozen, 6.5% trained (13 of 200 queries against 9: within noise; kept as the
  # real model trains them).
  et.qwen3_vl = _decoder(vision_depth=2, vision_dim=64, patch_size=8, steps=3000, train_deepstack=True)
  et.paligemma = _decoder(vision_depth=2, vision_dim=64, patch_size=8)  # 64 image tokens, prefix attention
  # Chameleon: the VQ-VAE (images at 32x32, 2 downsamplings: 8x8 = 64 codes per image; its convolutions
  # at full resolution dominate the cost) trains first, then the decoder on the frozen codes.
  et.chameleon = _decoder(
    vq_codes=256,
    vq_embed_dim=32,
    vq_channels=32,  # a multiple of 32 (the VQ-VAE's GroupNorm)
    vq_channel_multiplier=(1, 2, 2),
    vq_resolution=32,
    vq_steps=400,
    vq_batch_size=32,
    vq_lr=2e-3,
    vq_images=4000,
    # Reconstruction loss weighted toward pixels far from the image's median colour (the small objects
    # the captions name): a linear probe of the largest object's colour from each test image's bag of
    # codes (200 test images, 2000 train) reads 35% with plain MSE, 52% with 10 (majority 16%).
    vq_foreground_weight=10.0,
    vision_lr=1e-2,  # stage 1 trains only the code embeddings (pretrain_vision), on cached codes
    vision_steps=2000,
  )
  return et


def study_section() -> ml_collections.ConfigDict:
  """`config.study`: experiments.study, the models it runs and their SAEs."""
  study = ml_collections.ConfigDict()  # sae_jax/study/driver.py (experiments.study)
  study.models = ("clip", "qwen2_vl")  # keys of study.model, run in this order
  study.dataset = "shapes"  # "shapes" (generated under data_dir) | "coco" (the paths below)
  study.data_dir = ""  # "" = <workdir>/data
  study.coco_train_json = ""  # dataset="coco": captions JSON + image dir of the SAE training split
  study.coco_train_images = ""
  study.coco_test_json = ""  # dataset="coco": the evaluation split (paper: Karpathy 5k test)
  study.coco_test_images = ""
  study.train_extract_images = 2000  # train images whose activations train the SAEs; 0 = all
  # SAE training rows of a decoder: "pooled" (one base-variant pooled vector per train image and
  # caption: like the rows analysed) | "tokens" (every token row, as the paper trains its MLLM SAEs)
  study.sae_rows = "pooled"
  study.sae_steps = 2000
  study.sae_batch_size = 1024
  study.paper_name = ""  # "" = a study of models trained here; else the study it reproduces (report title)
  study.published = ml_collections.ConfigDict()  # <model>: the paper's table1/table2/table3 numbers, printed
  # beside the measured ones (configs/study_paper.py)
  # Table 1's spread over SAE seeds: the main SAE (config.seed) and sae_seeds - 1 more, trained on the
  # same rows with seeds config.seed + 1, ... (init and batch order); 1 = the main SAE only.
  study.sae_seeds = 3
  # Models run at once, one process each (their steps are independent until the report); each uses
  # encoder_training.threads torch threads. 1 = one after the other in this process.
  study.workers = 1
  # ... and over random half-subsets of the test pairs for the main SAE (analysis.table1_resamples); 0 = off.
  study.table1_pair_resamples = 20
  # Per model: `source` is "train:clip" / "train:qwen2_vl" (trained here by train_encoder) or a hub id
  # / local directory; SAE width c, k; pooling variants extracted on the test split.
  study.model = ml_collections.ConfigDict()
  decoder_pooling = ("mean", "last_token", "mean_no_image", "mean_no_prompt")
  for name, label, pooling, chat, bs in (
    ("clip", "CLIP (trained here)", ("embed",), False, 64),
    ("siglip", "SigLIP2 (trained here)", ("embed",), False, 64),
    ("qwen2_vl", "Qwen2-VL (trained here)", decoder_pooling, True, 32),
    ("qwen3_vl", "Qwen3-VL (trained here)", decoder_pooling, True, 32),
    ("paligemma", "PaliGemma (trained here)", decoder_pooling, False, 32),
    ("chameleon", "Chameleon (trained here)", decoder_pooling, False, 32),
  ):
    study.model[name] = ml_collections.ConfigDict(
      {
        "source": f"train:{name}",
        "label": label,
        "c": 512,
        "k": 8,
        "pooling": pooling,
        "batch_size": bs,
        "chat_template": chat,  # extraction (and, for a model trained here, training) in the chat format
        # Expected seconds of this model's steps: with study.workers > 1 models start longest first
        # (a short one last keeps both cores busy to the end); 0 = unknown (after the known ones).
        "cost_s": 0.0,
      }
    )
  return study
