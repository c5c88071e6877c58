"""Text-only encoders (BERT, MiniLM, ...): last-layer token states, mean-pooled like sentence-transformers.

`TextEncoder.encode(texts=...)` returns the last hidden state [B, T, d] with its attention mask;
`sae_jax.encoders.pooling.mean_pool` of that equals sentence-transformers' `Pooling(mean)` output
(before its optional `Normalize` module). Used for the real-weights check against all-MiniLM-L6-v2.
"""

import torch

from sae_jax.encoders import base
from sae_jax.encoders.pooling import TOKEN_SPECIAL, TOKEN_TEXT


class TextEncoder(base.Encoder):
  family = "text"
  kind = "text"
  max_length = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2

  def __init__(self, model, tokenizer, **kw):
    super().__init__(model, tokenizer, **kw)
    self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    self.special_ids = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=torch.long)

  @property
  def d(self) -> int:
    return int(self.model.config.hidden_size)

  def prepare(self, images=None, texts=None):
    if images is not None:
      raise base.SaeJaxError(f"{self.name}: a text encoder cannot encode images")
    return dict(
      self.tokenizer(
        list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
      )
    )

  @torch.inference_mode()
  def forward(self, prepared) -> base.EncoderOutput:
    inputs = {k: v.to(self.device) for k, v in prepared.items()}
    out = self.model(**inputs, output_hidden_states=self.layer != -1, return_dict=True)
    hidden = out.last_hidden_state
    if self.layer != -1:
      hidden = base.select_layer(out.hidden_states, self.layer, self.name)
    mask = inputs["attention_mask"].bool()
    special = torch.isin(inputs["input_ids"], self.special_ids.to(self.device))
    types = torch.where(special, TOKEN_SPECIAL, TOKEN_TEXT).to(torch.uint8)
    return base.EncoderOutput(
      hidden=hidden, attention_mask=mask, token_types=types, input_ids=inputs["input_ids"]
    )
