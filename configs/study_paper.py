"""The paper's study: its six models (hub checkpoints) on COCO, with its published Tables 1-3 beside.

  python -m experiments.study --config=configs/study_paper.py --workdir=runs/paper
Needs the weights (~60 GB in all) and a >= 24 GB GPU; COCO from $COCO_ROOT (default data/coco):
annotations/captions_train2017.json + train2017/ (SAE training) and annotations/captions_val2017.json
+ val2017/ (evaluation; the paper uses a 3k-query subset of the COCO test split: retrieval.max_queries).
Cost: extraction of 118k images x 5 captions per MLLM is ~3-5 h on an A100 and its token shards are
very large (prefer study.train_extract_images to subsample); CLIP and SigLIP2 take minutes.
The published numbers are printed beside the measured ones in the report.
"""

import os

import ml_collections

from configs import study_common

COCO_ROOT = os.environ.get("COCO_ROOT", "data/coco")
DECODER_POOLING = ("mean", "last_token", "mean_no_image", "mean_no_prompt")

# name: (hub id, label, SAE width c, pooling, extraction batch)
MODELS = {
  "clip": ("openai/clip-vit-base-patch32", "CLIP", 7168, ("embed",), 64),
  "siglip2": ("google/siglip2-base-patch16-512", "SigLIP2", 7168, ("embed",), 64),
  "qwen2vl": ("Qwen/Qwen2-VL-7B-Instruct", "Qwen2-VL-7B-Instruct", 32768, DECODER_POOLING, 8),
  "qwen3vl": ("Qwen/Qwen3-VL-8B-Instruct", "Qwen3-VL-8B-Instruct", 32768, DECODER_POOLING, 8),
  "paligemma2": ("google/paligemma2-3b-mix-224", "Paligemma2-3B-Mix-224", 20736, DECODER_POOLING, 8),
  "chameleon": ("facebook/chameleon-7b", "Chameleon-7B", 32768, DECODER_POOLING, 8),
}

# Paper Table 1 (J(S_E,S_A), J(S_E,S_B), J(S_A,S_B), triple overlap; top 1% sets).
TABLE1 = {
  "clip": (0.5674, 0.6831, 0.6126, 0.4796),
  "siglip2": (0.3948, 0.5775, 0.3783, 0.2915),
  "qwen2vl": (0.6494, 0.7957, 0.7146, 0.5989),
  "qwen3vl": (0.6610, 0.8547, 0.6700, 0.5486),
  "paligemma2": (0.7655, 0.8085, 0.7124, 0.6541),
  "chameleon": (0.6850, 0.8591, 0.7099, 0.5953),
}
# Paper Table 2 (COCO q_i -> c_t, 3k queries): (R@1, R@5, R@10) for Base and Removal.
TABLE2 = {
  "qwen2vl": ((2.95, 9.53, 15.13), (7.18, 20.91, 31.18)),
  "qwen3vl": ((2.60, 7.88, 12.33), (4.23, 13.53, 20.72)),
  "paligemma2": ((6.07, 15.46, 21.55), (24.47, 48.79, 61.03)),
  "chameleon": ((1.79, 7.58, 10.12), (3.32, 14.29, 16.87)),
}
# Paper Table 3: (R@1, R@5, R@10) for last token and mean pooling on MSCOCO (q_i -> c_t), NIGHTS (the
# image->image task) and CIRR (the composed task).
TABLE3 = {
  "qwen2vl": {
    "image_to_text": ((0.20, 2.65, 3.81), (2.71, 8.48, 13.22)),
    "image_to_image": ((1.89, 3.64, 5.88), (7.55, 22.80, 39.11)),
    "image_text_to_image": ((0.54, 1.49, 3.23), (1.41, 6.09, 9.47)),
  },
  "qwen3vl": {
    "image_to_text": ((0.34, 2.49, 3.86), (2.76, 7.36, 11.28)),
    "image_to_image": ((1.05, 2.96, 5.75), (6.46, 20.14, 36.42)),
    "image_text_to_image": ((0.49, 1.35, 3.38), (1.01, 4.46, 17.03)),
  },
  "paligemma2": {
    "image_to_text": ((1.63, 3.23, 5.81), (5.94, 14.22, 19.25)),
    "image_to_image": ((1.29, 4.26, 8.42), (8.96, 24.67, 44.79)),
    "image_text_to_image": ((0.43, 1.84, 4.16), (1.13, 9.06, 13.74)),
  },
}


def published() -> ml_collections.ConfigDict:
  """{model name: {"table1", "table2", "table3"}}: the paper's numbers, as `config.study.published`."""
  pub = ml_collections.ConfigDict()
  for name in MODELS:
    entry = {"label": MODELS[name][1], "table1": dict(zip(("J_EA", "J_EB", "J_AB", "triple"), TABLE1[name]))}
    if name in TABLE2:
      entry["table2"] = {"image_to_text": {"base": TABLE2[name][0], "removal": TABLE2[name][1]}}
    if name in TABLE3:
      entry["table3"] = {t: {"last_token": lt, "mean": mp} for t, (lt, mp) in TABLE3[name].items()}
    pub[name] = entry
  return pub


def get_config(arg: str = ""):
  del arg
  config = study_common.get_config()
  st = config.study
  st.paper_name = "Generative Giants, Retrieval Weaklings"
  st.dataset = "coco"
  st.coco_train_json = os.path.join(COCO_ROOT, "annotations", "captions_train2017.json")
  st.coco_train_images = os.path.join(COCO_ROOT, "train2017")
  st.coco_test_json = os.path.join(COCO_ROOT, "annotations", "captions_val2017.json")
  st.coco_test_images = os.path.join(COCO_ROOT, "val2017")
  st.train_extract_images = 0
  st.sae_batch_size = 4096  # paper Appendix A: Adam 8e-4, batch 4096 (the base defaults)
  st.sae_steps = 50_000
  st.models = tuple(MODELS)
  template = st.model["clip"].to_dict()  # study_common's per-model fields (their defaults live there)
  st.model = ml_collections.ConfigDict()
  for name, (hub, label, c, pooling, batch) in MODELS.items():
    st.model[name] = ml_collections.ConfigDict(
      {
        **template,
        "source": hub,
        "label": label,
        "c": c,
        "k": 50,
        "pooling": pooling,
        "batch_size": batch,
        "chat_template": name.startswith("qwen"),  # as the authors' Qwen-VL runs
      }
    )
  st.published = published()
  config.retrieval.max_queries = 3000
  config.extract.log_every_s = 60.0
  return config
