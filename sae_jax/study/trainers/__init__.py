"""Trains the image-text models of the shapes study (torch, CPU) and saves them as HF checkpoints.

The paper's six families, each trained as a model of its kind:
  clip        `CLIPModel`, the symmetric InfoNCE loss
  siglip      `Siglip2Model` (NaFlex SigLIP2; transformers has it), the pairwise sigmoid loss
  qwen2_vl    `Qwen2VLForConditionalGeneration`  \\
  qwen3_vl    `Qwen3VLForConditionalGeneration`   |  generalists: the mixture below, next-token loss
  paligemma   `PaliGemmaForConditionalGeneration` |  on the answer tokens
  chameleon   `ChameleonForConditionalGeneration` /  (its VQ image tokenizer is trained first,
                                                     its reconstruction loss weighted toward the
                                                     objects: `chameleon.vq_foreground_weight`)

Generative models are trained in two stages, as real MLLMs are. Stage 1: the vision tower and
projector (Chameleon: the embeddings of its VQ code tokens) are aligned with the decoder's word
embeddings by InfoNCE (`generative.vision_*`), standing in for the contrastively pretrained tower a
real MLLM starts from; the tower is then frozen. (Trained from scratch inside the decoder, the
tower's features collapse to a near-constant vector and the decoder ignores the image.) Qwen3-VL's
DeepStack mergers (vision features added to the decoder's first layers, which stage 1 does not
align) stay trainable in stage 2 (`qwen3_vl.train_deepstack`). Stage 2 learns what the embeddings
carry the way real MLLMs do, from a mixture of tasks
(`config.encoder_training.mixture`: the probability of each task per training sequence; each
sequence's loss is the mean over its answer tokens, so a task's weight is its share of the loss):
  caption     image + `generative.caption_prompt` -> one of the image's captions
  image_word  `config.extract.templates.image` (the exact extraction prompt) -> the scene's one-word
              summary (`shapes.summary_word`: the largest object's shape or colour,
              `generative.summary`)
  text_word   `config.extract.templates.text` on a caption -> the same word for that caption's scene
  text_lm     caption modelling on text alone (`caption <eos>`, loss on every token)
  question    image + a short question about colour / shape / count / position -> its answer
  image_gen   Chameleon only (the family that generates images): a caption -> the image's VQ codes
              (`<racm3:break>` codes `<eoss>`, loss on every code), the text-to-image half of its
              mixed-modal training; the image-token positions then predict image content
Prompts are assembled by the family's own extraction encoder (`sae_jax.encoders`), so the training
sequences are token for token the extraction sequences plus the answer; the Qwen families train and
extract inside their chat format (`chat_template`), the answer closed by `<|im_end|>`.

Tokenizers are byte-level BPE trained on the train captions, the prompts, questions and chat
scaffold (`config.encoder_training.vocab_size` leaves room for every word to become one token).

The modules: `common` (kinds, splits, schedule, progress, checkpoint save), `tokenizers`,
`families` (each family at the config's sizes, through `sae_jax.encoders.factories`), `contrastive`,
`vq` (Chameleon's image tokenizer), `mixture` (the generalist mixture), `generative` (both stages),
`quality` (R@1 with chance, probes).

`train_encoder(config, kind, data_dir, out_dir)` writes `out_dir/` with `save_pretrained` (model,
processor, tokenizer), which `config.extract.model_name=<out_dir>` loads like a hub checkpoint, and
`out_dir/quality.json` (test-split figures: retrieval R@1 with chance, probes, samples). A directory
holding `quality.json` is complete and is not retrained.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from sae_jax.errors import SaeJaxError
from sae_jax.study.trainers import contrastive, generative
from sae_jax.study.trainers.common import CONTRASTIVE_KINDS, KINDS, QUALITY_FILE


def train_encoder(
  config: Any, kind: str, data_dir: str, out_dir: str, log: Callable = print, chat_template: bool = False
) -> dict:
  """Trains model `kind` on the shapes data in `data_dir` into `out_dir` (skipped when complete).
  `chat_template`: generative models train inside their chat format (extraction must use it too)."""
  import torch

  if kind not in KINDS:
    raise SaeJaxError(
      f"config.study.model.<name>.source=train:{kind}: expected train:<kind> with kind one of {KINDS}"
    )
  done = os.path.join(out_dir, QUALITY_FILE)
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  for split in ("train", "test"):
    if not os.path.exists(os.path.join(data_dir, f"captions_{split}.json")):
      raise SaeJaxError(f"{data_dir}: captions_{split}.json is missing (make the shapes data first)")
  torch.set_num_threads(int(config.encoder_training.threads))
  out_dir = os.path.abspath(out_dir)
  if kind in CONTRASTIVE_KINDS:
    return contrastive.train_contrastive(kind, config, data_dir, out_dir, log)
  return generative.train_generative(kind, config, data_dir, out_dir, log, chat_template)
