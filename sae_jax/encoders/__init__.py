"""Model-family wrappers that turn images and texts into activations (see `base.Encoder`).

`load_encoder(extract_cfg)` builds the right wrapper from `config.extract`:
  model_name  a hub id (`openai/clip-vit-base-patch32`), a local directory, or `tiny:<family>` for a
              tiny random-weight model built offline (tests, smoke runs).
  family      '' to infer from the model config's `model_type`, else one of FAMILIES.
  layer, device ('auto': cuda:<local rank>, see `auto_device` | 'cpu' | 'cuda[:i]'), dtype ('auto': bf16 on GPU, fp32 on CPU), templates.
Adding a model family = one module with an Encoder subclass + one line in `_FAMILY_OF_MODEL_TYPE`.
"""

import os

from sae_jax.encoders import tiny
from sae_jax.errors import SaeJaxError

# model_type (HF config) -> family module/class
_FAMILY_OF_MODEL_TYPE = {
  "clip": "clip",
  "siglip": "siglip",
  "siglip2": "siglip",
  "qwen2_vl": "qwen_vl",
  "qwen2_5_vl": "qwen_vl",
  "qwen3_vl": "qwen_vl",
  "paligemma": "paligemma",
  "chameleon": "chameleon",
  "bert": "text",
  "roberta": "text",
  "xlm-roberta": "text",
  "mpnet": "text",
  "distilbert": "text",
}
FAMILIES = ("clip", "siglip", "qwen_vl", "paligemma", "chameleon", "text")


def encoder_class(family: str):
  if family == "clip":
    from sae_jax.encoders.clip import ClipEncoder as cls
  elif family == "siglip":
    from sae_jax.encoders.siglip import SiglipEncoder as cls
  elif family == "qwen_vl":
    from sae_jax.encoders.qwen_vl import QwenVLEncoder as cls
  elif family == "paligemma":
    from sae_jax.encoders.paligemma import PaliGemmaEncoder as cls
  elif family == "chameleon":
    from sae_jax.encoders.chameleon import ChameleonEncoder as cls
  elif family == "text":
    from sae_jax.encoders.text import TextEncoder as cls
  else:
    raise SaeJaxError(f"config.extract.family={family!r}: expected one of {FAMILIES} (or empty to infer)")
  return cls


def family_of(model_type: str) -> str:
  try:
    return _FAMILY_OF_MODEL_TYPE[model_type]
  except KeyError:
    raise SaeJaxError(
      f"model_type {model_type!r} is not supported; supported: "
      f"{sorted(_FAMILY_OF_MODEL_TYPE)} (set config.extract.family to force one)"
    ) from None


# Variables launchers set to a process's rank on its own machine, checked in this order.
LOCAL_RANK_ENV = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK")  # torchrun, srun, mpirun


def auto_device(cuda_count: int, env) -> tuple[str, str]:
  """(device, why) of `extract.device="auto"` for a process seeing `cuda_count` GPUs.

  Several processes on one GPU server (torchrun, srun, mpirun) each take the GPU of their local
  rank; a launcher that already gave each process one GPU (CUDA_VISIBLE_DEVICES) leaves count 1."""
  if cuda_count <= 0:
    return "cpu", "no CUDA device"
  for var in LOCAL_RANK_ENV:
    if var in env:
      try:
        rank = int(env[var])
      except ValueError:
        raise SaeJaxError(f"${var}={env[var]!r}: expected an integer local rank") from None
      if cuda_count == 1:
        return "cuda:0", f"${var}={rank}, one visible GPU"
      if not 0 <= rank < cuda_count:
        raise SaeJaxError(
          f"${var}={rank}: this machine shows {cuda_count} GPUs (cuda:0..cuda:{cuda_count - 1}); run at "
          "most one extraction process per GPU or set config.extract.device"
        )
      return f"cuda:{rank}", f"${var}={rank}"
  return "cuda:0", "no local rank variable"


def resolve_device(device: str) -> str:
  import torch

  if device in (None, "", "auto"):
    device, why = auto_device(torch.cuda.device_count() if torch.cuda.is_available() else 0, os.environ)
    if device != "cpu":
      print(f"extract: device {device} ({why})", flush=True)
  return device


TOKENIZER_PROBE = "A small red circle in the top left, 2 stars; Summarize the above sentence in one word:"


def _faithful_tokenizer(proc, name):
  """The processor, its tokenizer encoding as the directory's tokenizer.json does.

  Some processors rebuild their tokenizer class from the vocabulary with the class's own
  normaliser (transformers 5: `Siglip2Processor` -> `Siglip2Tokenizer`, Gemma's "▁" spaces), which
  silently re-tokenizes a checkpoint whose tokenizer.json was trained otherwise (a SigLIP2 trained
  here then retrieves at chance). Where the two disagree on a probe, tokenizer.json wins; hub
  checkpoints, whose class and file agree, are returned as loaded."""
  tok_file = os.path.join(name, "tokenizer.json") if os.path.isdir(name) else ""
  tok = getattr(proc, "tokenizer", None)
  if not tok_file or not os.path.exists(tok_file) or tok is None:
    return proc
  from tokenizers import Tokenizer
  from transformers import AutoProcessor, TokenizersBackend

  want = Tokenizer.from_file(tok_file).encode(TOKENIZER_PROBE, add_special_tokens=False).ids
  if list(tok(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]) == want:
    return proc
  return AutoProcessor.from_pretrained(name, tokenizer=TokenizersBackend.from_pretrained(name))


def _load_processor(family, name):
  return _faithful_tokenizer(_load_processor_as_declared(family, name), name)


def _load_processor_as_declared(family, name):
  from transformers import AutoProcessor, AutoTokenizer

  if family == "text":
    return AutoTokenizer.from_pretrained(name)
  if family == "qwen_vl":  # the stock processor needs torchvision for its video processor
    import transformers
    from transformers import AutoConfig
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    from sae_jax.encoders.qwen_vl import make_processor

    try:
      return AutoProcessor.from_pretrained(name)
    except Exception:  # pylint: disable=broad-except
      mt = AutoConfig.from_pretrained(name).model_type
      proc_cls = {
        "qwen2_vl": transformers.Qwen2VLProcessor,
        "qwen2_5_vl": transformers.Qwen2_5_VLProcessor,
        "qwen3_vl": transformers.Qwen3VLProcessor,
      }[mt]
      return make_processor(
        proc_cls, Qwen2VLImageProcessorPil.from_pretrained(name), AutoTokenizer.from_pretrained(name)
      )
  return AutoProcessor.from_pretrained(name)


def load_encoder(cfg):
  """Encoder for `config.extract` (see module docstring)."""
  from sae_jax.encoders import base

  name = cfg.model_name
  device = resolve_device(cfg.device)
  dtype = base.torch_dtype(cfg.dtype, device)
  templates = dict(cfg.templates)
  family = cfg.family
  kw = dict(layer=int(cfg.layer), device=device, dtype=dtype, templates=templates, name=name)
  kw["chat_template"] = bool(cfg.chat_template)
  if name.startswith("tiny:"):
    model, processor = tiny.build(name[len("tiny:") :], scale=int(cfg.tiny_scale))
    family = family or family_of(model.config.model_type)
  else:
    from transformers import AutoConfig, AutoModel

    if not (os.path.isdir(name) or (name.count("/") == 1 and not name.startswith(("/", ".")))):
      raise SaeJaxError(
        f"config.extract.model_name={name!r}: not a local directory nor a hub id "
        f"(owner/name) nor tiny:<family>"
      )
    try:
      hf_cfg = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
      raise SaeJaxError(
        f"config.extract.model_name={name!r}: cannot load its config ({str(e).splitlines()[0]})"
      ) from None
    family = family or family_of(hf_cfg.model_type)
    # Straight onto the GPU when there is one (no full CPU copy of a 7B model first).
    placement = {"device_map": device} if device.startswith("cuda") else {}
    model = AutoModel.from_pretrained(name, dtype=dtype, **placement)
    processor = _load_processor(family, name)
  enc = encoder_class(family)(model, processor, **kw)
  if enc.chat_template:
    if enc.kind != "decoder":
      raise SaeJaxError(f"config.extract.chat_template=True: {family} is not a decoder VLM; set it to False")
    enc.chat_wrap()  # a family without a chat format fails here, before any work
  if family in ("clip", "siglip"):
    enc.tokens = bool(cfg.contrastive_tokens)
  return enc
