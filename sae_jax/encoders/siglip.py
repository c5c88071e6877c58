"""SigLIP and SigLIP2 (fixed-resolution checkpoints such as google/siglip2-base-patch16-512 load as
`SiglipModel`; NaFlex ones as `Siglip2Model`, whose processor adds `pixel_attention_mask` and
`spatial_shapes`). Texts are padded to `max_length` (64), as SigLIP was trained; embeddings are the
final pooled (MAP-head) image and text embeddings.
"""

from sae_jax.encoders.clip import ContrastiveEncoder, model_inputs


class SiglipEncoder(ContrastiveEncoder):
  family = "siglip"
  text_padding = dict(padding="max_length", truncation=True)

  @property
  def d_embed(self) -> int:
    return int(self.model.config.text_config.hidden_size)

  def text_inputs(self, texts):
    tok = self.processor.tokenizer
    max_len = int(getattr(self.model.config.text_config, "max_position_embeddings", 64))
    return model_inputs(tok, tok(list(texts), return_tensors="pt", max_length=max_len, **self.text_padding))
