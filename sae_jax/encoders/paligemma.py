"""PaliGemma and PaliGemma2: residual stream of the Gemma decoder.

Sequence layout (as the processor builds it): `<image>*image_seq_length <bos> prefix \\n`. Image
positions are `input_ids == config.image_token_id` (older configs: `image_token_index`). We pass
`token_type_ids` of zeros, as the processor does for a prompt without suffix (the whole input is
the bidirectional prefix).
"""

import torch

from sae_jax.encoders import base


class PaliGemmaEncoder(base.DecoderEncoder):
  family = "paligemma"
  padding_side = "left"

  @property
  def image_token_id(self) -> int:
    return base.config_token_id(self.model.config, "image_token_id", "image_token_index")

  def prefix_ids(self, has_image):
    # With an image, BOS follows the image tokens (it is part of the image segment).
    return [] if has_image else [int(self.tokenizer.bos_token_id)]

  def image_segments(self, images):
    segs, vision = base.processor_image_segments(
      self.processor, images, self.processor.image_token, ("pixel_values",)
    )
    bos = int(self.tokenizer.bos_token_id)
    out = []
    for s in segs:  # keep `<image>*n <bos>`, drop the processor's trailing newline
      k = list(s).index(bos) if bos in list(s) else len(s) - 1
      out.append(s[: k + 1])
    return out, vision

  def extra_inputs(self, input_ids, token_types):
    return {"token_type_ids": torch.zeros_like(input_ids)}
