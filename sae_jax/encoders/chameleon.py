"""Chameleon: early-fusion decoder; images become VQ-VAE codes inside the token stream.

Image positions are `input_ids == vocabulary_map["<image>"]` (the model swaps in the VQ tokens);
each image segment is `<racm3:break> <image>*image_seq_length <eoss>` as the processor builds it.
Every sequence starts with BOS.
"""

from sae_jax.encoders import base


class ChameleonEncoder(base.DecoderEncoder):
  family = "chameleon"

  @property
  def image_token_id(self) -> int:
    # The model itself finds image positions through vocabulary_map["<image>"].
    vocab = getattr(self.model.config, "vocabulary_map", None) or {}
    if not isinstance(vocab.get("<image>"), int):
      raise base.SaeJaxError(
        f"model config {type(self.model.config).__name__} has no image token "
        f'(vocabulary_map["<image>"]); cannot find image positions in input_ids'
      )
    return int(vocab["<image>"])

  def prefix_ids(self, has_image):
    return [int(self.tokenizer.bos_token_id)]

  def extra_special_ids(self):
    p = self.processor
    return [
      i
      for i in (getattr(p, "image_start_token_id", None), getattr(p, "image_end_token_id", None))
      if isinstance(i, int)
    ]

  def image_segments(self, images):
    segs, vision = base.processor_image_segments(
      self.processor, images, self.processor.image_token, ("pixel_values",), return_for_text_completion=True
    )
    bos = int(self.tokenizer.bos_token_id)
    return [s[1:] if len(s) and int(s[0]) == bos else s for s in segs], vision
