"""The encoder interface: one small class per model family turns images/texts into activations.

An `Encoder` runs a (torch) Hugging Face model and returns an `EncoderOutput`:
  hidden          [B, T, d] hidden states of the chosen layer (`layer`, default -1 = last layer)
  attention_mask  [B, T] bool, True on real tokens
  token_types     [B, T] uint8: 0 special, 1 image, 2 text, 3 prompt (same codes as the shard format)
  embeds          [B, d_embed] final embeddings (contrastive models) or None
  input_ids       [B, T] or None
All arrays are torch tensors on the model's device; `to_numpy`/`to_jax` convert (dlpack, no copy on CPU).

Inputs are built by `encode(images, texts)`: images is a list of PIL images or None, texts a list of
strings or None; with both, sample i is the pair (images[i], texts[i]).

Decoder VLMs (`DecoderEncoder`) build each sequence from a template with `{image}` and `{text}`
placeholders (`config.extract.templates`): the image placeholder becomes the processor's own
image-token expansion, the caption is tokenized on its own, and the literal template text is the
prompt. Token types are therefore exact by construction. Adding a model family = one file with a
subclass that says how to build its image segment and which extra inputs its forward needs.
"""

import abc
import dataclasses
import re
from typing import Any, Optional, Sequence

import jax.numpy as jnp
import numpy as np
import torch

from sae_jax.encoders.pooling import TOKEN_IMAGE, TOKEN_PROMPT, TOKEN_SPECIAL, TOKEN_TEXT, mean_pool
from sae_jax.errors import SaeJaxError


@dataclasses.dataclass
class EncoderOutput:
  hidden: Optional[torch.Tensor]
  attention_mask: Optional[torch.Tensor]
  token_types: Optional[torch.Tensor]
  embeds: Optional[torch.Tensor] = None
  input_ids: Optional[torch.Tensor] = None


def to_numpy(t: torch.Tensor, dtype=np.float32) -> np.ndarray:
  """torch tensor (any device/dtype) -> NumPy; floats become `dtype`."""
  if t.is_floating_point():
    t = t.to(torch.float32)
  arr = t.detach().cpu().numpy()
  return arr.astype(dtype, copy=False) if arr.dtype.kind == "f" else arr


def to_jax(t: torch.Tensor):
  """torch -> jax.Array through dlpack (zero copy for contiguous CPU fp32 tensors)."""
  t = t.detach()
  if t.is_floating_point() and t.dtype != torch.float32:
    t = t.to(torch.float32)
  if t.device.type != "cpu":
    t = t.cpu()
  return jnp.from_dlpack(t.contiguous())


def select_layer(hidden_states: Sequence[torch.Tensor], layer: int, what: str) -> torch.Tensor:
  """hidden_states[layer] with a one-line error when out of range (num_layers + 1 entries)."""
  n = len(hidden_states)
  if not -n <= layer < n:
    raise SaeJaxError(
      f"config.extract.layer={layer} is out of range for {what}: it has {n - 1} "
      f"layers ({n} hidden states, valid layers {-n}..{n - 1})"
    )
  return hidden_states[layer]


def torch_dtype(name: str, device: str) -> torch.dtype:
  """'auto' -> bf16 on GPU, fp32 on CPU; else the named dtype."""
  if name in (None, "", "auto"):
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
  try:
    return {
      "float32": torch.float32,
      "fp32": torch.float32,
      "bfloat16": torch.bfloat16,
      "bf16": torch.bfloat16,
      "float16": torch.float16,
      "fp16": torch.float16,
    }[name]
  except KeyError:
    raise SaeJaxError(f"config.extract.dtype={name!r}: expected auto, float32, bfloat16 or float16") from None


class Encoder(abc.ABC):
  """A model family wrapper. Subclasses set `family` and `kind` ('contrastive' | 'decoder')."""

  family: str = ""
  kind: str = ""

  def __init__(
    self,
    model,
    processor,
    *,
    layer: int = -1,
    device: str = "cpu",
    dtype=None,
    templates: Optional[dict] = None,
    name: str = "",
    chat_template: bool = False,
  ):
    self.device = torch.device(device)
    self.dtype = dtype or torch_dtype("auto", device)
    self.model = model.to(self.device, self.dtype).eval()
    self.processor = processor
    self.layer = layer
    self.templates = dict(templates or {})  # config.extract.templates: the one place they are set
    # config.extract.chat_template: wrap every prompt in the family's chat format (decoders only).
    self.chat_template = bool(chat_template)
    self.name = name or self.family
    self.check_layer()

  def num_hidden_states(self) -> int:
    """Entries of `hidden_states` (num_layers + 1) of the model whose layer `layer` selects."""
    cfg = self.model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    return int(cfg.num_hidden_layers) + 1

  def check_layer(self):
    """Validate `layer` against the model config before anything runs or is written."""
    n = self.num_hidden_states()
    if not -n <= self.layer < n:
      raise SaeJaxError(
        f"config.extract.layer={self.layer} is out of range for {self.name}: it has "
        f"{n - 1} layers ({n} hidden states, valid layers {-n}..{n - 1})"
      )

  @property
  @abc.abstractmethod
  def d(self) -> int:
    """Width of the token activations (`hidden`)."""

  @property
  def d_embed(self) -> Optional[int]:
    """Width of the final embeddings (`embeds`), None for decoders."""
    return None

  def encode(self, images=None, texts=None) -> EncoderOutput:
    """Encode a batch: images only, texts only, or pairs (= forward(prepare(...)))."""
    return self.forward(self.prepare(images, texts))

  @abc.abstractmethod
  def prepare(self, images=None, texts=None) -> Any:
    """CPU side of `encode` (processor, tokenizer, assembly): host tensors for `forward`.

    Extraction runs it in a background thread for batch i+1 while `forward` runs batch i."""

  @abc.abstractmethod
  def forward(self, prepared) -> EncoderOutput:
    """Device side of `encode`: the model forward on `prepare`'s output."""

  def _to_device(self, inputs: dict) -> dict:
    return {
      k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
      for k, v in inputs.items()
    }

  def rows(self, out: EncoderOutput) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token rows of a batch for the activation shards: (rows [n,d] f32, types [n] u8, sample [n] int)."""
    mask = out.attention_mask.bool()
    rows = to_numpy(out.hidden[mask])
    types = out.token_types[mask].cpu().numpy().astype(np.uint8)
    sample = torch.nonzero(mask, as_tuple=True)[0].cpu().numpy().astype(np.int64)
    return rows, types, sample


def split_template(template: str) -> list[tuple[str, str]]:
  """'{image} {text} Summarize' -> [('image',''), ('literal',' '), ('text',''), ('literal',' Summarize')]."""
  parts = []
  for piece in re.split(r"(\{image\}|\{text\})", template):
    if piece == "{image}":
      parts.append(("image", ""))
    elif piece == "{text}":
      parts.append(("text", ""))
    elif piece:
      parts.append(("literal", piece))
  return parts


class DecoderEncoder(Encoder):
  """Shared machinery of decoder VLMs: template assembly, padding, forward with hidden states."""

  kind = "decoder"
  padding_side = "left"

  def __init__(self, model, processor, **kw):
    super().__init__(model, processor, **kw)
    self.tokenizer = getattr(processor, "tokenizer", processor)
    self.special_ids = set(int(i) for i in self.tokenizer.all_special_ids)
    self.special_ids.update(self.extra_special_ids())
    pad = self.tokenizer.pad_token_id
    if pad is None:
      pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
    self.pad_id = int(pad)
    self.image_token_id  # validates the config early
    self._tok_cache = {}
    # Run the backbone (no LM head: no [B, T, vocab] logits) when given a ...ForConditionalGeneration.
    is_cg = type(self.model).__name__.endswith("ForConditionalGeneration")
    self.backbone = self.model.model if is_cg and hasattr(self.model, "model") else self.model

  # ---- family hooks ------------------------------------------------------------------------------
  @property
  @abc.abstractmethod
  def image_token_id(self) -> int:
    """Id of the image placeholder token in `input_ids` (raise SaeJaxError if the config has none)."""

  @abc.abstractmethod
  def image_segments(self, images) -> tuple[list[np.ndarray], dict]:
    """Token ids of each image's segment (its image tokens plus any markers) and the vision inputs."""

  def prefix_ids(self, has_image: bool) -> list[int]:
    """Ids every sequence starts with (e.g. BOS)."""
    return []

  def extra_inputs(self, input_ids: torch.Tensor, token_types: torch.Tensor) -> dict:
    """Family-specific extra forward inputs (e.g. mm_token_type_ids)."""
    return {}

  def extra_special_ids(self) -> list[int]:
    return []

  def chat_wrap(self) -> tuple[str, str]:
    """(prefix, suffix) of a one-turn user message in the family's chat format, generation prompt
    included: what the processor's `apply_chat_template` puts around the message content."""
    raise SaeJaxError(
      f"config.extract.chat_template=True: no chat format is defined for the {self.family} family "
      "here; set it to False"
    )

  def text_model_config(self):
    cfg = self.model.config
    return getattr(cfg, "text_config", cfg)

  @property
  def d(self) -> int:
    return int(self.text_model_config().hidden_size)

  # ---- assembly ---------------------------------------------------------------------------------
  def _tokenize(self, text: str) -> list[int]:
    ids = self._tok_cache.get(text)
    if ids is None:
      ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
      if len(self._tok_cache) < 64:  # template literals only
        self._tok_cache[text] = ids
    return ids

  def _typed(self, ids, kind) -> list[int]:
    return [TOKEN_SPECIAL if i in self.special_ids else kind for i in ids]

  def build(self, images=None, texts=None):
    """Assemble padded input_ids, attention_mask and token_types for a batch."""
    n = len(images) if images is not None else len(texts)
    mode = "pair" if images is not None and texts is not None else ("image" if images is not None else "text")
    if mode not in self.templates:
      raise SaeJaxError(
        f"config.extract.templates.{mode} is missing; expected a prompt template with "
        f"{ {'pair': '{image} and {text}', 'image': '{image}', 'text': '{text}'}[mode] }"
      )
    parts = split_template(self.templates[mode])
    chat = self.chat_wrap() if self.chat_template else None
    if sum(p[0] == "image" for p in parts) != (images is not None) or sum(p[0] == "text" for p in parts) != (
      texts is not None
    ):
      raise SaeJaxError(
        f"config.extract.templates.{mode}={self.templates[mode]!r}: expected exactly "
        f"{'one {image}' if images is not None else 'no {image}'} and "
        f"{'one {text}' if texts is not None else 'no {text}'} placeholder"
      )
    vision = {}
    img_ids = None
    if images is not None:
      img_ids, vision = self.image_segments(images)
    seqs, types = [], []
    text_ids = None
    if texts is not None:  # one batched tokenizer call; a template space before {text} joins the caption
      j = [k for k, p in enumerate(parts) if p[0] == "text"][0]
      lead = parts[j - 1][1] if j > 0 and parts[j - 1][0] == "literal" else ""
      lead = lead[len(lead.rstrip()) :]
      text_ids = self.tokenizer([lead + t for t in texts], add_special_tokens=False)["input_ids"]
    for i in range(n):
      ids = list(self.prefix_ids(images is not None))
      ty = [TOKEN_SPECIAL] * len(ids)
      if chat is not None:  # the chat scaffold is the same for every sample: typed special
        seg = self._tokenize(chat[0])
        ids += seg
        ty += [TOKEN_SPECIAL] * len(seg)
      for j, (kind, lit) in enumerate(parts):
        if kind == "image":
          seg = [int(x) for x in img_ids[i]]
          ids += seg
          ty += [TOKEN_IMAGE if x == self.image_token_id else TOKEN_SPECIAL for x in seg]
        elif kind == "text":
          seg = list(text_ids[i])
          ids += seg
          ty += self._typed(seg, TOKEN_TEXT)
        else:
          nxt = parts[j + 1][0] if j + 1 < len(parts) else None
          if nxt == "text":  # its trailing whitespace went to the caption's first word
            lit = lit.rstrip()
          if lit:
            seg = self._tokenize(lit)
            ids += seg
            ty += self._typed(seg, TOKEN_PROMPT)
      if chat is not None:
        seg = self._tokenize(chat[1])
        ids += seg
        ty += [TOKEN_SPECIAL] * len(seg)
      seqs.append(ids)
      types.append(ty)
    t = max(len(s) for s in seqs)
    input_ids = torch.full((n, t), self.pad_id, dtype=torch.long)
    attn = torch.zeros((n, t), dtype=torch.long)
    token_types = torch.zeros((n, t), dtype=torch.uint8)
    for i, (s, ty) in enumerate(zip(seqs, types)):
      sl = slice(t - len(s), t) if self.padding_side == "left" else slice(0, len(s))
      input_ids[i, sl] = torch.tensor(s, dtype=torch.long)
      attn[i, sl] = 1
      token_types[i, sl] = torch.tensor(ty, dtype=torch.uint8)
    return input_ids, attn, token_types, vision

  def prepare(self, images=None, texts=None):
    input_ids, attn, token_types, vision = self.build(images, texts)
    inputs = dict(input_ids=input_ids, attention_mask=attn, **self.extra_inputs(input_ids, token_types))
    inputs.update(vision)
    return inputs, token_types

  @torch.inference_mode()
  def forward(self, prepared) -> EncoderOutput:
    inputs, token_types = prepared
    input_ids, attn = inputs["input_ids"], inputs["attention_mask"]
    inputs = self._to_device(inputs)
    # The last layer is `last_hidden_state` (equal to hidden_states[-1]); asking for every layer's
    # states only when another layer is wanted saves num_layers x [B, T, d] of memory.
    last = self.layer in (-1, self.num_hidden_states() - 1)
    out = self.backbone(**inputs, output_hidden_states=not last, use_cache=False, return_dict=True)
    hidden = (
      out.last_hidden_state
      if last
      else select_layer(out.hidden_states, self.layer, f"{self.name} ({type(self.model).__name__})")
    )
    return EncoderOutput(
      hidden=hidden,
      attention_mask=attn.to(self.device).bool(),
      token_types=token_types.to(self.device),
      input_ids=input_ids,
    )

  @torch.inference_mode()
  def mean_pooled_per_layer(self, prepared) -> np.ndarray:
    """[num_hidden_states, B, d] float32: each hidden state (0: the input embeddings, the last: the
    layer `layer=-1` extracts) mean-pooled over the real tokens, as `pooling.mean_pool` pools the
    extracted layer. Shows where in the decoder image and text embeddings align or stop aligning."""
    inputs, _ = prepared
    mask = inputs["attention_mask"].numpy()
    out = self.backbone(
      **self._to_device(inputs), output_hidden_states=True, use_cache=False, return_dict=True
    )
    return np.stack([mean_pool(h.float().cpu().numpy(), mask) for h in out.hidden_states])


def strip_padding(ids: torch.Tensor, mask: torch.Tensor) -> list[np.ndarray]:
  """Rows of a padded [B,T] id tensor without their padding."""
  return [ids[i][mask[i].bool()].cpu().numpy() for i in range(ids.shape[0])]


def config_token_id(config, *names) -> int:
  """First of `names` set on `config` (or its text_config) as an int; SaeJaxError if none."""
  for obj in (config, getattr(config, "text_config", None)):
    for name in names:
      v = getattr(obj, name, None) if obj is not None else None
      if isinstance(v, int):
        return v
  raise SaeJaxError(
    f"model config {type(config).__name__} has no image token ({' / '.join(names)}); "
    f"cannot find image positions in input_ids"
  )


def processor_image_segments(
  processor, images, placeholder: str, vision_keys: Sequence[str], **kwargs
) -> tuple[list[np.ndarray], dict]:
  """Run the HF processor on one placeholder per image; return its id rows (unpadded) + vision inputs.

  Using the processor itself for the image segment means the image-token expansion (count and
  markers) is exactly the processor's.
  """
  batch = processor(
    images=list(images), text=[placeholder] * len(images), return_tensors="pt", padding=True, **kwargs
  )
  segs = strip_padding(batch["input_ids"], batch["attention_mask"])
  return segs, {k: batch[k] for k in vision_keys if k in batch}
