"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: last-layer (or `layer`) residual stream of the language model.

Image positions are `input_ids == config.image_token_id` (`<|image_pad|>`, 151655 in the real
vocabulary); each image segment is `<|vision_start|> <|image_pad|>*n <|vision_end|>` with n =
prod(image_grid_thw) / merge_size**2, produced by the processor itself. transformers 5.x also needs
`mm_token_type_ids` (1 on image tokens), which we pass.
"""

from sae_jax.encoders import base


def make_processor(processor_cls, image_processor, tokenizer, chat_template=None):
  """Build a Qwen-VL processor without a video processor (which needs torchvision)."""

  class _NoVideo(processor_cls):  # the stock __init__ requires a video processor class lookup
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
      super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

  _NoVideo.__name__ = processor_cls.__name__
  return _NoVideo(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


class QwenVLEncoder(base.DecoderEncoder):
  family = "qwen_vl"

  @property
  def image_token_id(self) -> int:
    return base.config_token_id(self.model.config, "image_token_id")

  def _marker(self, name, default):
    tok = self.processor.tokenizer
    return getattr(self.processor, name, None) or getattr(tok, name, None) or default

  def extra_special_ids(self):
    cfg = self.model.config
    return [
      getattr(cfg, n)
      for n in ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id")
      if isinstance(getattr(cfg, n, None), int)
    ]

  def image_segments(self, images):
    placeholder = (
      self._marker("vision_start_token", "<|vision_start|>")
      + self._marker("image_token", "<|image_pad|>")
      + self._marker("vision_end_token", "<|vision_end|>")
    )
    return base.processor_image_segments(
      self.processor, images, placeholder, ("pixel_values", "image_grid_thw")
    )

  def chat_wrap(self):
    # The chat templates of the released Qwen-VL checkpoints, one user turn plus the generation
    # prompt; Qwen2/2.5-VL insert a default system message, Qwen3-VL does not.
    user = "<|im_start|>user\n"
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    prefix = user if self.model.config.model_type.startswith("qwen3") else system + user
    return prefix, "<|im_end|>\n<|im_start|>assistant\n"

  def extra_inputs(self, input_ids, token_types):
    return {"mm_token_type_ids": (input_ids == self.image_token_id).long()}
