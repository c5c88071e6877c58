"""CLIP (and the shared contrastive-encoder machinery): final projected image/text embeddings.

The paper trains the contrastive-model SAEs on the final (projected) embeddings, one row per sample:
`embeds` [B, projection_dim] (not normalised; normalise at retrieval time). With
`config.extract.contrastive_tokens=True` the last-layer token states of the tower are returned too
(`hidden`, width of that tower), for the pooling variants.
"""

import torch

from sae_jax.encoders import base
from sae_jax.encoders.pooling import TOKEN_IMAGE, TOKEN_SPECIAL, TOKEN_TEXT


def model_inputs(tok, batch) -> dict:
  """What the processor would hand the text tower: the tokenizer's `model_input_names` (SigLIP's
  own tokenizer gives no attention_mask, and its text tower then attends to the padding, as trained)."""
  names = set(getattr(tok, "model_input_names", None) or batch.keys()) & {"input_ids", "attention_mask"}
  return {k: v for k, v in batch.items() if k in names}


class ContrastiveEncoder(base.Encoder):
  kind = "contrastive"
  text_padding = dict(padding=True, truncation=True)
  tokens = False

  @property
  def d(self) -> int:
    return self.d_embed

  @property
  def d_embed(self) -> int:
    cfg = self.model.config
    return int(getattr(cfg, "projection_dim", None) or cfg.text_config.hidden_size)

  def num_hidden_states(self) -> int:
    cfg = self.model.config
    return min(int(cfg.text_config.num_hidden_layers), int(cfg.vision_config.num_hidden_layers)) + 1

  def image_inputs(self, images) -> dict:
    return dict(self.processor.image_processor(images=list(images), return_tensors="pt"))

  def text_inputs(self, texts) -> dict:
    tok = self.processor.tokenizer
    max_len = getattr(self.model.config.text_config, "max_position_embeddings", None)
    return model_inputs(tok, tok(list(texts), return_tensors="pt", max_length=max_len, **self.text_padding))

  def prepare(self, images=None, texts=None):
    if images is not None and texts is not None:
      raise base.SaeJaxError(
        f"{self.name}: a contrastive model encodes images and texts separately; "
        f"composed (image,text) queries need a decoder model"
      )
    if images is not None:
      return "image", self.image_inputs(images)
    return "text", self.text_inputs(texts)

  @torch.inference_mode()
  def forward(self, prepared) -> base.EncoderOutput:
    mode, inputs = prepared
    inputs = self._to_device(inputs)
    need_hidden = self.tokens or self.layer != -1
    if mode == "image":
      out = self.model.get_image_features(**inputs, output_hidden_states=need_hidden, return_dict=True)
      mask = torch.ones(out.last_hidden_state.shape[:2], dtype=torch.bool, device=self.device)
      if "pixel_attention_mask" in inputs:  # NaFlex (SigLIP2): padded patches
        mask = inputs["pixel_attention_mask"].bool()
      types = torch.full(mask.shape, TOKEN_IMAGE, dtype=torch.uint8, device=self.device)
      what = f"{self.name} vision tower"
    else:
      out = self.model.get_text_features(**inputs, output_hidden_states=need_hidden, return_dict=True)
      mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
      types = torch.where(mask, TOKEN_TEXT, TOKEN_SPECIAL).to(torch.uint8)
      what = f"{self.name} text tower"
    hidden = out.last_hidden_state
    if need_hidden:
      hidden = base.select_layer(out.hidden_states, self.layer, what)
    return base.EncoderOutput(
      hidden=hidden,
      attention_mask=mask,
      token_types=types,
      embeds=out.pooler_output,
      input_ids=inputs.get("input_ids"),
    )

  def rows(self, out):
    """One row per sample: its final embedding (what the paper's contrastive SAEs train on)."""
    rows = base.to_numpy(out.embeds)
    types = torch.full(
      (rows.shape[0],), TOKEN_IMAGE if out.input_ids is None else TOKEN_TEXT, dtype=torch.uint8
    ).numpy()
    return rows, types, torch.arange(rows.shape[0]).numpy()


class ClipEncoder(ContrastiveEncoder):
  family = "clip"
