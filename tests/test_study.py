"""The whole study end to end on the tiny shapes preset: the six families trained here, report from
the stages' JSON, saved models loadable like hub checkpoints (reproducing the study's embeddings),
resume after SIGKILL."""

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from configs import study_shapes
from sae_jax import encoders, retrieval_tasks, uncertainty
from sae_jax.encoders import pooling
from sae_jax.errors import SaeJaxError
from sae_jax.study import analysis, layout
from sae_jax.study import driver as study
from sae_jax.study.report import collect, render, tables
from sae_jax.study.trainers import common, families, mixture, tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHANCE_FACTOR = 3.0  # the tiny CLIP (120 steps, 400 images) must beat chance image->text R@1 by this


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("study"))
  config = study_shapes.get_config("tiny")
  t0 = time.perf_counter()
  out = study.run_study(config, wd, log=print)
  print(f"tiny study: {time.perf_counter() - t0:.1f} s")
  return wd, config, out


def _json(path):
  with open(path) as f:
    return json.load(f)


def _md_rows(md: str, heading: str) -> list:
  """Cells of the table under `heading` (header and separator dropped)."""
  section = md.split(heading, 1)[1].split("\n## ", 1)[0]
  rows = [line for line in section.splitlines() if line.startswith("|")]
  return [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows[2:]]


def test_every_report_artifact_exists_and_parses(tiny):
  wd, config, out = tiny
  md = open(out["report"]["md"]).read()
  page = open(out["report"]["html"]).read()
  data = _json(out["report"]["json"])
  assert set(data["models"]) == set(study_shapes.MODELS)
  figs = out["report"]["figures"]
  names = {os.path.basename(f) for f in figs}
  assert {
    "fig2_modality_kde.png",
    "fig3_cumulative_energy.png",
    "fig4_masking_qwen2_vl.png",
    "fig4_masking_composed.png",
  } <= names
  for f in figs:
    assert f"(figures/{os.path.basename(f)})" in md
    with Image.open(f) as im:
      assert im.size[0] > 300 and im.size[1] > 200
  embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
  assert len(embedded) == len(figs)
  for b in embedded:
    with Image.open(io.BytesIO(base64.b64decode(b))) as im:
      im.load()
  lines = md.splitlines()
  n_tables = sum(b.startswith("|") and not a.startswith("|") for a, b in zip([""] + lines, lines))
  # Settings, probes, one per model's quality (three for a generative one: retrieval, R@1 by layer,
  # mixture), Tables 1-3.
  assert n_tables == 1 + 1 + len(study_shapes.MODELS) + 2 * len(study_shapes.GENERATIVE) + 3
  assert 'src="figures/' not in page and page.count("<table>") == n_tables
  for h in ("## What each model learned", "## Table 1", "## Table 2", "## Table 3", "## Findings"):
    assert h in md
  # The tiny preset says what it is at the top of the report; its findings claim only what clears
  # the noise (a model at chance compared with nothing, no Table 1 reading of an SAE with FVU >= 1).
  assert md.splitlines()[2] == f"**{config.preset_note}**" and "plumbing" in config.preset_note
  assert data["preset_note"] == config.preset_note
  assert len(data["findings"]) >= 5
  for name, m in data["models"].items():
    base = m["retrieval"]["image_to_text"][m["settings"]["base_variant"]]
    at_chance = base["R@1_ci95"][0] <= base["chance"]["R@1"]
    said = [f for f in data["findings"] if f.startswith(f"Retrieval ({m['label']})")]
    assert bool(said) == at_chance and (not said or "is at chance" in said[0])
    if at_chance:
      assert not any(m["label"] in f and "retrieves" in f for f in data["findings"])
    if m["settings"]["eval_fvu"] >= 1:
      assert not any(f.startswith(f"Overlap ({m['label']})") for f in data["findings"])
    assert 0 <= m["settings"]["never_fire_fraction"] <= 1


def test_trained_clip_beats_chance_and_reloads_as_extracted(tiny):
  wd, config, _ = tiny
  steps = _json(os.path.join(wd, "clip", layout.STEPS_FILE))
  q = steps["model"]["summary"]
  assert q["test_images"] == 100 and q["test_captions"] == 500
  assert q["i2t_chance"] == pytest.approx(1.0)
  assert q["i2t_R@1"] >= CHANCE_FACTOR * q["i2t_chance"], q
  # The extraction stage loaded the saved directory through load_encoder: same model, same R@1.
  res = _json(os.path.join(wd, "clip", "sae", "retrieval", "results.json"))
  assert res["image_to_text"]["embed"]["R@1"] == pytest.approx(q["i2t_R@1"], abs=1.0)
  assert (
    res["image_to_text"]["embed"]["n_queries"] == 100 and res["image_to_text"]["embed"]["n_candidates"] == 500
  )
  for name in study_shapes.GENERATIVE:
    qq = _json(os.path.join(wd, name, layout.STEPS_FILE))["model"]["summary"]
    answered = set(mixture.MIXTURE_TASKS) - {"image_gen"}  # image_gen: its loss, no exact answers
    assert set(qq["answer_accuracy"]) == answered and len(qq["samples"]) == 1
    # Only Chameleon, the family that generates images, has image_gen in its mixture.
    assert set(qq["mixture"]) == answered | ({"image_gen"} if name == "chameleon" else set())
    assert qq["i2t_chance"] == pytest.approx(1.0) and qq["chat_template"] == name.startswith("qwen")
    assert qq["vision_stage_steps"] == 20
  vq = _json(os.path.join(wd, "chameleon", layout.STEPS_FILE))["model"]["summary"]
  assert vq["vq_steps"] == 20 and vq["vq_reconstruction_mse"] < vq["vq_pixel_variance"], vq


FAMILIES = [
  ("clip", "clip", "CLIPModel"),
  ("siglip", "siglip", "Siglip2Model"),
  ("qwen2_vl", "qwen_vl", "Qwen2VLForConditionalGeneration"),
  ("qwen3_vl", "qwen_vl", "Qwen3VLForConditionalGeneration"),
  ("paligemma", "paligemma", "PaliGemmaForConditionalGeneration"),
  ("chameleon", "chameleon", "ChameleonForConditionalGeneration"),
]


@pytest.mark.parametrize("name,family,arch", FAMILIES)
def test_saved_model_reproduces_the_study_embeddings(tiny, name, family, arch):
  """Each trained checkpoint, read back through the preset's loader (load_encoder on
  extract.model_name=<dir>), gives the test split's pooled embeddings the study extracted."""
  wd, config, _ = tiny
  c = layout.stage_config(config, wd, name, "test")
  assert json.load(open(os.path.join(c.extract.model_name, "config.json")))["architectures"] == [arch]
  enc = encoders.load_encoder(c.extract)
  variant = layout.base_variant(config, name)
  with np.load(os.path.join(wd, name, "sae", "activations", f"pooled_{variant}.npz")) as z:
    ids, img_ref = z["image_unique_ids"][:3], z["image_unique"][:3]
    captions, txt_ref = list(z["captions"][:4]), z["text"][:4]
  from sae_jax.data import coco

  src = coco.CocoCaptionsJson(c.extract.captions_json, c.extract.image_dir)
  by_id = {im.image_id: im for im in src.images}
  images = [coco.load_image(by_id[int(i)]) for i in ids]
  for got_items, ref in ((dict(images=images), img_ref), (dict(texts=captions), txt_ref)):
    out = enc.encode(**got_items)
    if enc.kind == "contrastive":
      got = out.embeds.float().numpy()
    else:
      got = np.asarray(pooling.pool(variant, out.hidden.float().numpy(), out.attention_mask.numpy()))
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
  assert enc.chat_template == config.study.model[name].chat_template


@pytest.mark.parametrize("name", study_shapes.MODELS)
def test_study_embeddings_retrieve_as_the_trained_model_did(tiny, name):
  """The retrieval stage's base image->text / text->image R@1 on the test split (embeddings of the
  checkpoint read back from disk) equals the figure the trainer measured on the model in memory
  (quality.json): a reload that re-tokenizes or drops weights changes it (a SigLIP2 whose processor
  rebuilt its tokenizer retrieved at chance after 47.8% in memory)."""
  wd, config, _ = tiny
  q = _json(os.path.join(wd, "models", name, common.QUALITY_FILE))
  assert q["test_images"] == config.shapes.test_images  # the quality figures cover the whole split
  res = _json(os.path.join(wd, name, "sae", "retrieval", "results.json"))
  base = layout.base_variant(config, name)
  assert res["image_to_text"][base]["R@1"] == pytest.approx(q["i2t_R@1"], abs=1e-6)
  assert res["text_to_image"][base]["R@1"] == pytest.approx(q["t2i_R@1"], abs=1e-6)


def test_a_processor_that_rebuilds_its_tokenizer_gets_the_saved_one(tmp_path):
  """Siglip2Processor.from_pretrained rebuilds a Siglip2Tokenizer (Gemma's normaliser) from the
  vocabulary; the loader keeps tokenizer.json's encoding instead."""
  from configs import study_common
  from sae_jax import encoders as enc_lib

  cfg = study_common.get_config().encoder_training
  caps = ["a small red circle in the top left", "two big blue stars and a green ring"] * 20
  tok = tokenizers.train_tokenizer(caps, tokenizers.GEMMA_SPECIALS, 400, "gemma")
  model, proc = families.build_siglip(tok, cfg, 64)
  proc.save_pretrained(str(tmp_path))
  model.save_pretrained(str(tmp_path))
  from transformers import AutoProcessor

  probe = "a small red circle in the top left"
  want = tok(probe)["input_ids"]
  assert AutoProcessor.from_pretrained(str(tmp_path)).tokenizer(probe)["input_ids"] != want  # the trap
  assert enc_lib._load_processor("siglip", str(tmp_path)).tokenizer(probe)["input_ids"] == want


def test_models_in_worker_processes_give_the_same_study(tiny, tmp_path):
  """study.workers=2 (one spawned process per model) reproduces the sequential study's figures."""
  wd, config, _ = tiny
  c = study_shapes.get_config("tiny")
  c.study.models = ("clip", "siglip")
  c.study.workers = 2
  c.study.data_dir = os.path.join(wd, "data")  # the same generated world
  out = study.run_study(c, str(tmp_path), log=print)
  for name in c.study.models:
    got, ref = (_json(os.path.join(d, name, layout.STEPS_FILE)) for d in (str(tmp_path), wd))
    assert got["model"]["summary"]["i2t_R@1"] == ref["model"]["summary"]["i2t_R@1"]
    assert got["sae"]["summary"]["eval_fvu"] == pytest.approx(ref["sae"]["summary"]["eval_fvu"], rel=1e-5)
    assert got["analyze"]["summary"]["table1"] == ref["analyze"]["summary"]["table1"]
  assert set(_json(out["report"]["json"])["models"]) == {"clip", "siglip"}


def test_workers_start_the_longest_model_first():
  c = study_shapes.get_config("tiny")
  names = ("clip", "siglip", "qwen2_vl", "chameleon")
  assert study.start_order(c, names) == ("chameleon", "siglip", "qwen2_vl", "clip")  # the preset's costs
  for n in names:
    c.study.model[n].cost_s = 0.0
  assert study.start_order(c, names) == names  # no costs: the study's order
  c.study.model.siglip.cost_s, c.study.model.chameleon.cost_s, c.study.model.clip.cost_s = 5.0, 9.0, 5.0
  assert study.start_order(c, names) == ("chameleon", "clip", "siglip", "qwen2_vl")
  c.study.model.clip.cost_s = -1.0
  with pytest.raises(SaeJaxError, match=r"config.study.model.clip.cost_s=-1.0: expected >= 0"):
    study.start_order(c, names)


def test_generative_tokenizers_keep_words_whole(tiny):
  """Every caption word and template word is one token of the trained tokenizers (two with the
  punctuation attached to it), and the Qwen tokenizers keep their chat special tokens."""
  from transformers import AutoTokenizer

  wd, config, _ = tiny
  with open(os.path.join(wd, "data", "captions_test.json")) as f:
    caps = [a["caption"] for a in json.load(f)["annotations"]]
  prompts = [t.replace("{image}", "").replace("{text}", "x") for t in config.extract.templates.values()]
  for name in study_shapes.GENERATIVE:
    tok = AutoTokenizer.from_pretrained(os.path.join(wd, "models", name))
    pieces = tokenizers.word_pieces(tok, caps + prompts)
    assert "Summarize" in pieces and "circle" in pieces
    for w, n in pieces.items():
      assert n <= (1 if w.isalpha() else 2), (name, w, n)
    if name.startswith("qwen"):
      assert tok.convert_tokens_to_ids("<|im_end|>") != tok.unk_token_id
      assert len(tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"]) == 3


@pytest.mark.parametrize("name,family", [(n, f) for n, f, _ in FAMILIES])
def test_saved_model_loads_like_a_hub_checkpoint(tiny, name, family):
  from safetensors.numpy import load_file

  wd, config, _ = tiny
  path = os.path.join(wd, "models", name)
  c = layout.stage_config(config, wd, name, "test")
  assert c.extract.model_name == path
  enc = encoders.load_encoder(c.extract)
  assert enc.family == family
  saved = load_file(os.path.join(path, "model.safetensors"))
  loaded = {k: v.detach().numpy() for k, v in enc.model.state_dict().items()}
  # Every tensor of the loaded model is the saved one (none left at a fresh random init).
  matched = 0
  for k, v in loaded.items():
    cands = [s for s in saved if s.endswith(k.split(".", 1)[-1]) and saved[s].shape == v.shape]
    if cands:
      assert any(np.array_equal(saved[s], v) for s in cands), k
      matched += 1
  assert matched >= 0.9 * len(loaded)
  out = enc.forward(enc.prepare(texts=["a small red circle in the top left"]))
  assert np.isfinite(out.hidden.detach().numpy()).all()


def test_report_tables_equal_the_stage_json(tiny):
  wd, config, out = tiny
  md = open(out["report"]["md"]).read()
  data = _json(out["report"]["json"])
  ours = lambda rows: [r for r in rows if not r[0].endswith("(paper)")]  # noqa: E731
  t1 = {r[0]: r for r in ours(_md_rows(md, "## Table 1"))}
  t2 = {(r[0], r[1], r[2]): r for r in ours(_md_rows(md, "## Table 2"))}
  t3 = {(r[0], r[1], r[2]): r for r in ours(_md_rows(md, "## Table 3"))}
  # The paper's published numbers sit beside ours (configs/study_paper.py, PAPER_MODEL).
  paper_t1 = [r for r in _md_rows(md, "## Table 1") if r[0].endswith("(paper)")]
  assert ["0.6494", "0.7957", "0.7146", "0.5989"] in [r[3:7] for r in paper_t1]  # Qwen2-VL-7B's row
  assert len(paper_t1) == len(study_shapes.MODELS)
  for name in study_shapes.MODELS:
    sae = os.path.join(wd, name, "sae")
    label = config.study.model[name].label
    table1 = _json(os.path.join(sae, "analysis", "table1.json"))["rows"][0]
    results = _json(os.path.join(sae, "retrieval", "results.json"))
    assert data["models"][name]["retrieval"] == collect.relative_paths(results, wd)
    keys = ("J(S_E,S_A)", "J(S_E,S_B)", "J(S_A,S_B)", "triple_overlap")
    assert t1[label][1:] == [str(table1["c"]), str(table1["set_size"])] + [f"{table1[k]:.4f}" for k in keys]
    assert {k[0] for k in t2 if k[0] == label}, label  # Table 2 lists every model
    base = layout.base_variant(config, name)
    for task, by in results.items():
      tl = tables.task_label(task, "shapes")
      for setting, suffix in (("Base", ""), ("Removal", "+removal"), ("Whitening (baseline)", "+whitening")):
        row = t2[(label, tl, setting)]
        assert row[3:6] == [f"{by[base + suffix][k]:.2f}" for k in ("R@1", "R@5", "R@10")]
  assert {k[0] for k in t2} == {config.study.model[n].label for n in study_shapes.MODELS}
  # Table 3: every generative family on the three tasks (image<->text from the retrieval stage,
  # image->image and composed from tasks/results.json): R@1 [95% CI], R@5, R@10, chance R@1.
  for name in study_shapes.GENERATIVE:
    label = config.study.model[name].label
    by_task = {
      **_json(os.path.join(wd, name, "sae", "retrieval", "results.json")),
      **_json(os.path.join(wd, name, "tasks", "results.json")),
    }
    assert set(by_task) == {"image_to_text", "text_to_image", "image_to_image", "image_text_to_image"}
    for task, by in by_task.items():
      for setting, v in (("Last token", "last_token"), ("Mean pooling", "mean")):
        r = by[v]
        lo, hi = r["R@1_ci95"]
        assert t3[(label, tables.task_label(task, "shapes"), setting)][3:] == [
          f"{r['R@1']:.2f} [{lo:.2f}, {hi:.2f}]",
          f"{r['R@5']:.2f}",
          f"{r['R@10']:.2f}",
          f"{r['chance']['R@1']:.2f}",
        ]
  assert len(t3) == 2 * 4 * len(study_shapes.GENERATIVE)
  assert not any(k[0] == config.study.model.clip.label for k in t3)  # CLIP has no token pooling
  # Figure 3: one curve per model, in the report's order.
  import matplotlib.pyplot as plt

  from sae_jax.plots import analysis as plot_a

  fig = plot_a.draw_cumulative_energy(render.concept_runs(data, wd))
  try:
    curves = [ln.get_label() for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")]
    assert [c.split(" (c=")[0] for c in curves] == [config.study.model[n].label for n in study_shapes.MODELS]
  finally:
    plt.close(fig)


def test_table1_over_sae_seeds(tiny):
  """Table 1's spread: per-seed rows from each seed's table1.json (seed config.seed is the main SAE),
  mean and sample std equal NumPy's over them; the seeds are different SAEs on the same test pairs."""
  wd, config, out = tiny
  md = open(out["report"]["md"]).read()
  data = _json(out["report"]["json"])
  t1 = {r[0]: r for r in _md_rows(md, "## Table 1")}
  keys = collect.TABLE1_KEYS
  seeds = [config.seed + i for i in range(config.study.sae_seeds)]
  assert config.study.sae_seeds >= 2
  for name in study_shapes.MODELS:
    dirs = [os.path.join(wd, name, "sae")] + [os.path.join(wd, name, f"sae_seed{s}") for s in seeds[1:]]
    rows = [_json(os.path.join(d, "analysis", "table1.json"))["rows"][0] for d in dirs]
    vals = np.array([[r[k] for k in keys] for r in rows])
    got = data["models"][name]["table1_seeds"]
    assert got["seeds"] == seeds and got["n"] == len(seeds)
    assert [[got["per_seed"][str(s)][k] for k in keys] for s in seeds] == vals.tolist()
    np.testing.assert_allclose([got["mean"][k] for k in keys], vals.mean(0), rtol=1e-12)
    np.testing.assert_allclose([got["std"][k] for k in keys], vals.std(0, ddof=1), rtol=1e-12, atol=1e-15)
    label = config.study.model[name].label
    row = t1[f"{label}: {len(seeds)} SAE seeds ({', '.join(map(str, seeds))}), mean ± std"]
    assert row[3:] == [f"{m:.4f} ± {sd:.4f}" for m, sd in zip(vals.mean(0), vals.std(0, ddof=1))]
    # The main SAE's spread over half-subsets of the pairs, beside it.
    rs = rows[0]["table1_resampled"]
    assert (
      rs["resamples"] == config.study.table1_pair_resamples and data["models"][name]["table1_resampled"] == rs
    )
    row = t1[f"{label}: {rs['resamples']} subsets of {rs['pairs_per_resample']} pairs, mean ± std"]
    assert row[3:] == [f"{rs['mean'][k]:.4f} ± {rs['std'][k]:.4f}" for k in keys]
    # Different SAEs (own init and batch order), analysed on the same pairs.
    energies = []
    for d in dirs:
      with np.load(os.path.join(d, "analysis", "concepts.npz")) as z:
        energies.append(z["energy"])
        assert int(z["n_pairs"]) == data["models"][name]["settings"]["test_pairs"]
    assert not np.allclose(energies[0], energies[1])
    fvu = got["eval_fvu"]
    assert fvu[str(seeds[0])] == data["models"][name]["settings"]["eval_fvu"]
    assert all(
      fvu[str(s)] == _json(os.path.join(d, layout.SEED_SUMMARY))["eval_fvu"]
      for s, d in zip(seeds[1:], dirs[1:])
    )


def test_quality_section_and_probe_table(tiny):
  wd, config, out = tiny
  md = open(out["report"]["md"]).read()
  probes = {r[0]: r for r in _md_rows(md, "## What each model learned")}
  for name in study_shapes.MODELS:
    label = config.study.model[name].label
    q = _json(os.path.join(wd, name, layout.STEPS_FILE))["model"]["summary"]
    p = q["probes"]
    cells = [str(p["n_scenes"])]
    for w in ("shape", "colour", "position"):
      acc = p[w]["accuracy"]
      cells += ["-" if acc is None else f"{acc:.1f}%", f"{p[w]['majority']:.1f}%"]
    assert probes[label][1:] == cells
    section = md.split(f"### {label}\n", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    rows = {
      r[0]: r for r in (ln.strip().strip("|").split("|") for ln in section.splitlines() if ln.startswith("|"))
    }
    rows = {k.strip(): [c.strip() for c in v] for k, v in rows.items()}
    assert rows["image -> text"][1:3] == [f"{q['i2t_R@1']:.1f}%", f"{q['i2t_chance']:.1f}%"]
    assert rows["caption -> caption (same image)"][1:3] == [f"{q['c2c_R@1']:.1f}%", f"{q['c2c_chance']:.1f}%"]
    if name in study_shapes.GENERATIVE:
      for t, a in q["answer_accuracy"].items():
        assert rows[t][1:] == [f"{q['mixture'][t]:.2f}", f"{a:.1f}%"]
      s = q["samples"][0]
      assert f"- “{s['generated']}” / " + "; ".join(f"“{r}”" for r in s["reference"]) in section


def test_resume_after_sigkill_ends_with_the_same_report(tiny, tmp_path):
  wd, config, out = tiny
  wd2 = str(tmp_path / "resumed")
  shutil.copytree(wd, wd2)
  # Forget every step of the generative model after its training, and the report.
  steps_path = os.path.join(wd2, "qwen2_vl", layout.STEPS_FILE)
  steps = _json(steps_path)
  with open(steps_path, "w") as f:
    json.dump({"model": steps["model"]}, f)
  seed_dirs = [f"qwen2_vl/sae_seed{config.seed + i}" for i in range(1, config.study.sae_seeds)]
  for d in ["qwen2_vl/train_extract", "qwen2_vl/sae", "report"] + seed_dirs[-1:]:
    shutil.rmtree(os.path.join(wd2, d))
  # CLIP as if run with one seed fewer: its sae_seeds step re-runs, reads the first seed back and
  # trains the missing one.
  clip_steps = os.path.join(wd2, "clip", layout.STEPS_FILE)
  cs = _json(clip_steps)
  cs["sae_seeds"]["summary"]["seeds"] = cs["sae_seeds"]["summary"]["seeds"][:-1]
  with open(clip_steps, "w") as f:
    json.dump(cs, f)
  shutil.rmtree(os.path.join(wd2, "clip", seed_dirs[-1].split("/")[1]))
  log_path = str(tmp_path / "log.txt")
  cmd = [
    sys.executable,
    "-m",
    "experiments.study",
    "--config=configs/study_shapes.py:tiny",
    f"--workdir={wd2}",
  ]
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  parts = os.path.join(wd2, "qwen2_vl", "train_extract", "activations", "parts")
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(parts) and any(f.endswith(".npz") for f in os.listdir(parts)):
      break
    time.sleep(0.1)
  assert proc.poll() is None, open(log_path).read()[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  text = open(log_path).read()
  assert "qwen2_vl: extract_train ..." in text and "qwen2_vl: extract_train done" not in text, text[-2000:]
  study.run_study(config, wd2, log=print)
  a = _json(os.path.join(wd, "report", "report.json"))
  with open(os.path.join(wd2, "report", "report.json")) as f:
    # Paths are relative to the study's workdir; the copied CLIP outputs still name the first one.
    b = json.loads(f.read().replace(wd + os.sep, ""))
  for name in study_shapes.MODELS:
    for key in ("table1", "table1_seeds", "retrieval", "tasks", "energy", "rank_sweep", "settings"):
      assert b["models"][name][key] == a["models"][name][key], (name, key)
  assert b["findings"] == a["findings"]


def test_paper_preset_prints_the_published_numbers_beside(tiny):
  from configs import study_paper

  wd, _, _ = tiny
  paper = study_paper.get_config()
  assert paper.study.models == ("clip", "siglip2", "qwen2vl", "qwen3vl", "paligemma2", "chameleon")
  assert paper.study.model.qwen2vl.source == "Qwen/Qwen2-VL-7B-Instruct"
  data = _json(os.path.join(wd, "report", "report.json"))
  # The measured tiny Qwen2-VL under the paper's model name: its published rows follow its own.
  data = {
    "dataset": "MSCOCO",
    "models": {"qwen2vl": dict(data["models"]["qwen2_vl"], label="Qwen2-VL-7B-Instruct")},
  }
  t1 = tables.table1_md(paper, data)
  assert t1[-1] == "| Qwen2-VL-7B-Instruct (paper) | | | 0.6494 | 0.7957 | 0.7146 | 0.5989 |"
  t2 = "\n".join(tables.table2_md(paper, data))
  assert (
    "| Qwen2-VL-7B-Instruct (paper) | MSCOCO q_i -> c_t | Removal | 7.18 | 20.91 | 31.18 | | published |"
    in t2
  )
  t3 = "\n".join(tables.table3_md(paper, data))
  assert "| Qwen2-VL-7B-Instruct (paper) | MSCOCO q_i -> c_t | Last token | 0.20 | 2.65 | 3.81 | |" in t3
  assert "| Qwen2-VL-7B-Instruct (paper) | NIGHTS q_i -> c_i | Mean pooling | 7.55 | 22.80 | 39.11 | |" in t3
  assert "| Qwen2-VL-7B-Instruct (paper) | CIRR (q_i, q_t) -> c_i | Last token | 0.54 | 1.49 | 3.23 | |" in t3


def test_report_tables_show_a_k_the_run_did_not_score_as_a_dash():
  """`retrieval.ks=(1,5)` (or a pool under 10 candidates) leaves no R@10: the paper's column says "-"."""
  from configs import study_shapes
  from sae_jax.study.report import tables

  cfg = study_shapes.get_config("tiny")
  by = {"embed": {"R@1": 10.0, "R@5": 20.0, "settings": {}}}
  data = {
    "dataset": "shapes",
    "models": {
      "clip": {"label": "CLIP", "settings": {"base_variant": "embed"}, "retrieval": {"image_to_text": by}}
    },
  }
  assert (
    tables.table2_md(cfg, data)[2]
    == "| CLIP | shapes q_i -> c_t | Base | 10.00 | 20.00 | - | - | pooling=embed |"
  )
  by3 = {v: {"R@1": 1.0, "R@5": 2.0} for v in ("last_token", "mean")}
  data["models"]["clip"]["retrieval"] = {"image_to_text": by3}
  assert tables.table3_md(cfg, data)[2].endswith("| Last token | 1.00 | 2.00 | - | - |")


def test_report_html_renders_tables_headings_code_and_embeds_figures(tmp_path):
  """report.html is report.md through markdown-it-py: table cells, headings, inline code, and every
  figure linked under figures/ embedded as a PNG data URI (no link back to the file)."""
  fig_dir = tmp_path / "figures"
  fig_dir.mkdir()
  png = b"\x89PNG\r\n\x1a\nnot really an image"
  (fig_dir / "fig2_modality_kde.png").write_bytes(png)
  md = "\n".join(
    [
      "## Table 1: overlap",
      "",
      "Read from `table1.json` (a < b).",
      "",
      "| Model | J(S_E,S_A) |",
      "|---|---:|",
      "| CLIP | 0.5000 |",
      "| Qwen2-VL: 3 SAE seeds, mean ± std | 0.4000 ± 0.0100 |",
      "",
      "![Figure 2: modality](figures/fig2_modality_kde.png)",
    ]
  )
  page = render.render_html(md, str(fig_dir))
  assert page.startswith("<!DOCTYPE html>") and page.endswith("</body></html>\n")
  assert "<h2>Table 1: overlap</h2>" in page
  assert "<p>Read from <code>table1.json</code> (a &lt; b).</p>" in page
  assert page.count("<table>") == 1
  assert re.findall(r"<th[^>]*>([^<]*)</th>", page) == ["Model", "J(S_E,S_A)"]
  assert re.findall(r"<td[^>]*>([^<]*)</td>", page) == [
    "CLIP",
    "0.5000",
    "Qwen2-VL: 3 SAE seeds, mean ± std",
    "0.4000 ± 0.0100",
  ]
  (src,) = re.findall(r'<img src="([^"]+)" alt="Figure 2: modality"', page)
  assert src.startswith("data:image/png;base64,")
  assert base64.b64decode(src[len("data:image/png;base64,") :]) == png
  assert 'src="figures/' not in page


def test_other_tasks_are_scored_for_every_model(tiny):
  """image->image for all six models, composed for the generative four; R@1 equals a NumPy cosine
  argmax over the extracted embeddings and the M-BEIR qrels."""
  wd, config, _ = tiny
  with open(os.path.join(wd, "data", "tasks", "tasks.json")) as f:
    counts = json.load(f)["counts"]
  for name in study_shapes.MODELS:
    res = _json(os.path.join(wd, name, "tasks", "results.json"))
    want = {"image_to_image"} | ({"image_text_to_image"} if name in study_shapes.GENERATIVE else set())
    assert set(res) == want, name
    assert _json(os.path.join(wd, name, layout.STEPS_FILE))["tasks"]["summary"] == res
    for task, by in res.items():
      variant = layout.base_variant(config, name)
      r = by[variant]
      assert r["n_queries"] == counts[task]["queries"] and r["n_candidates"] == counts[task]["candidates"]
      act = os.path.join(wd, name, "tasks", task, "activations")
      with (
        np.load(os.path.join(act, f"mbeir_queries_pooled_{variant}.npz")) as q,
        np.load(os.path.join(act, f"mbeir_pool_pooled_{variant}.npz")) as p,
      ):
        qe, pe, qids, pids = q["embeddings"], p["embeddings"], q["ids"], p["ids"]
      qrels = _json(os.path.join(act, "mbeir_qrels.json"))
      qe = qe / np.linalg.norm(qe, axis=1, keepdims=True)
      pe = pe / np.linalg.norm(pe, axis=1, keepdims=True)
      sim = qe @ pe.T
      is_pos = np.array([[str(d) in qrels[str(i)] for d in pids] for i in qids])
      pos = np.where(is_pos, sim, -np.inf).max(1)
      other = np.where(is_pos, -np.inf, sim).max(1)
      # Float32 near-ties (1e-5) may go either way in the blocked search: bound R@1 by both readings.
      sure, maybe = 100 * np.mean(pos > other + 1e-5), 100 * np.mean(pos >= other - 1e-5)
      assert sure - 1e-6 <= r["R@1"] <= maybe + 1e-6, (name, task, sure, maybe, r["R@1"])
      # A query's own reference image (same file) is not ranked (CIRR); chance R@1 of a random
      # ranking: positives / ranked candidates, averaged over queries.
      with np.load(os.path.join(act, f"mbeir_queries_pooled_{variant}.npz")) as q:
        q_paths = q["image_paths"]
      with np.load(os.path.join(act, f"mbeir_pool_pooled_{variant}.npz")) as p:
        is_ref = (q_paths[:, None] == p["image_paths"][None, :]) & (p["modality"] == "image")[None, :]
      if not retrieval_tasks.TASKS[task].exclude_reference:
        is_ref[:] = False
      ranked = is_pos.shape[1] - is_ref.sum(1)
      assert r["chance"]["R@1"] == pytest.approx(100 * np.mean(is_pos.sum(1) / ranked))
      # Every variant: first-hit ranks within the NumPy bounds (ties either way), R@K and the 95%
      # intervals recomputed from them (same draws as config.retrieval.bootstrap_*).
      with np.load(os.path.join(wd, name, "tasks", task, "first_hit_ranks.npz")) as z:
        saved = {v: z[v] for v in z.files}
      assert set(saved) == set(by)
      for v, rec in by.items():
        with (
          np.load(os.path.join(act, f"mbeir_queries_pooled_{v}.npz")) as q,
          np.load(os.path.join(act, f"mbeir_pool_pooled_{v}.npz")) as p,
        ):
          qv, pv = q["embeddings"], p["embeddings"]
          assert (q["ids"] == qids).all() and (p["ids"] == pids).all()
        qv = qv / np.linalg.norm(qv, axis=1, keepdims=True)
        pv = pv / np.linalg.norm(pv, axis=1, keepdims=True)
        sv = qv @ pv.T
        best = np.where(is_pos, sv, -np.inf).max(1, keepdims=True)
        neg = np.where(is_pos | is_ref, -np.inf, sv)
        lo_rank = np.minimum((neg > best + 1e-5).sum(1), 10)
        hi_rank = np.minimum((neg >= best - 1e-5).sum(1), 10)
        ranks = saved[v]
        assert ranks.shape == (r["n_queries"],) and ((lo_rank <= ranks) & (ranks <= hi_rank)).all(), (name, v)
        ci = uncertainty.recall_with_ci(
          ranks, (1, 5, 10), n_boot=config.retrieval.bootstrap_n, seed=config.retrieval.bootstrap_seed
        )
        for k in ("R@1", "R@5", "R@10"):
          assert rec[k] == pytest.approx(100 * np.mean(ranks < int(k[2:])))
          assert rec[f"{k}_ci95"] == ci[f"{k}_ci95"]
          assert rec[f"{k}_ci95"][0] <= rec[k] <= rec[f"{k}_ci95"][1]
        assert rec["R@1_ci95"][1] - rec["R@1_ci95"][0] > 0 or rec["R@1"] in (0.0, 100.0)


def test_layer_recall_against_numpy():
  """Per-layer image->text R@1 and its bootstrap interval against an independent NumPy computation
  (cosine argmax; the same seeded resamples of the queries, percentile interval)."""
  rng = np.random.default_rng(0)
  n, per, d, n_boot = 30, 3, 8, 300
  owner = np.repeat(np.arange(n), per)
  rng.shuffle(owner)
  img = rng.normal(size=(3, n, d)).astype(np.float32)
  # Layer 0 unaligned, layer 1 partly, layer 2 strongly: three different R@1.
  txt = np.stack([s * img[i][owner] + rng.normal(size=(n * per, d)) for i, s in enumerate((0.0, 0.6, 3.0))])
  got = analysis.layer_recall(img, txt.astype(np.float32), owner, n_boot=n_boot, seed=5)
  draws = np.random.default_rng(5).integers(0, n, size=(n_boot, n))
  r1 = []
  for layer in range(3):
    a = img[layer] / np.linalg.norm(img[layer], axis=1, keepdims=True)
    b = txt[layer] / np.linalg.norm(txt[layer], axis=1, keepdims=True)
    hits = (owner[(a @ b.T).argmax(1)] == np.arange(n)).astype(np.float64)
    assert got[layer]["layer"] == layer
    assert got[layer]["R@1"] == pytest.approx(100 * hits.mean())
    lo, hi = np.percentile(100 * hits[draws].mean(1), [2.5, 97.5])
    assert got[layer]["R@1_ci95"] == pytest.approx([lo, hi])
    r1.append(got[layer]["R@1"])
  assert r1[0] < r1[1] < r1[2]
  with pytest.raises(SaeJaxError, match="text_owner"):
    analysis.layer_recall(img, txt[:, :-1].astype(np.float32), owner, n_boot=10, seed=0)


@pytest.mark.parametrize("name", ["qwen2_vl", "chameleon"])
def test_per_layer_pooling_is_each_layer_mean_pooled(tiny, name):
  """`mean_pooled_per_layer` equals the extraction forward at each `layer`, mean-pooled."""
  wd, config, _ = tiny
  enc = encoders.load_encoder(layout.stage_config(config, wd, name, "test").extract)
  from sae_jax.data import coco

  src = coco.CocoCaptionsJson(*(layout.data_paths(config, wd)[k] for k in ("test_json", "test_images")))
  for items in (
    dict(images=[coco.load_image(im) for im in src.images[:3]]),
    dict(texts=["a red star", "two dots"]),
  ):
    prepared = enc.prepare(**items)
    got = enc.mean_pooled_per_layer(prepared)
    assert got.shape[0] == enc.num_hidden_states()
    for layer in range(got.shape[0]):
      enc.layer = layer
      out = enc.forward(prepared)
      want = pooling.mean_pool(out.hidden.float().numpy(), out.attention_mask.numpy())
      np.testing.assert_allclose(got[layer], want, atol=1e-5, rtol=1e-5)


def test_layer_recall_step_in_the_study_and_report(tiny):
  """Every decoder's per-layer R@1 is in report.json and report.md; its last layer, the one the study
  extracts, gives the retrieval stage's base image->text R@1; contrastive models have none."""
  wd, config, out = tiny
  data = _json(out["report"]["json"])
  md = open(out["report"]["md"]).read()
  for name in study_shapes.MODELS:
    lr = data["models"][name]["layers"]
    if name not in study_shapes.GENERATIVE:
      assert lr == {}
      continue
    enc = encoders.load_encoder(layout.stage_config(config, wd, name, "test").extract)
    assert [r["layer"] for r in lr["layers"]] == list(range(enc.num_hidden_states()))
    assert (lr["n_queries"], lr["n_candidates"]) == (config.shapes.test_images, 5 * config.shapes.test_images)
    res = _json(os.path.join(wd, name, "sae", "retrieval", "results.json"))
    assert lr["layers"][-1]["R@1"] == pytest.approx(res["image_to_text"]["mean"]["R@1"], abs=1e-6)
    assert lr["chance"]["R@1"] == pytest.approx(100 / config.shapes.test_images)
    section = md.split(f"### {data['models'][name]['label']}", 1)[1].split("\n### ", 1)[0]
    table = section.split("Mean-pooled image->text R@1 at each hidden layer", 1)[1].split("\n\n", 2)[1]
    rows = [line.strip("|").split("|") for line in table.splitlines()[2:]]
    assert [int(r[0]) for r in rows] == [r["layer"] for r in lr["layers"]]
    assert [float(r[1].split("[")[0]) for r in rows] == pytest.approx(
      [r["R@1"] for r in lr["layers"]], abs=0.006
    )


def test_trainers_recall_and_chance_against_numpy():
  """The trainers' quality figures (through retrieval.evaluate and uncertainty.chance_recall) equal a
  direct NumPy computation: cosine argmax per query, chance = mean share of positives in the pool."""
  from sae_jax.study.trainers import quality

  rng = np.random.default_rng(3)
  n, per = 40, np.array([5, 3, 4, 5] * 10)
  owner = np.repeat(np.arange(n), per)
  rng.shuffle(owner)
  img = rng.normal(size=(n, 12)).astype(np.float32)
  txt = (img[owner] + 1.2 * rng.normal(size=(owner.size, 12))).astype(np.float32)
  a = img / np.linalg.norm(img, axis=1, keepdims=True)
  b = txt / np.linalg.norm(txt, axis=1, keepdims=True)
  sim = a @ b.T
  got = quality.recall_at_1(img, txt, owner)
  assert got["i2t_R@1"] == pytest.approx(100 * np.mean(owner[sim.argmax(1)] == np.arange(n)), abs=1e-9)
  assert got["t2i_R@1"] == pytest.approx(100 * np.mean(sim.argmax(0) == owner), abs=1e-9)
  assert got["i2t_chance"] == pytest.approx(100 * np.mean(per[np.arange(n)] / owner.size), rel=1e-9)
  assert got["t2i_chance"] == pytest.approx(100 / n, rel=1e-9)
  cc = b @ b.T
  np.fill_diagonal(cc, -np.inf)
  got = quality.caption_to_caption_r1(txt, owner)
  assert got["c2c_R@1"] == pytest.approx(100 * np.mean(owner[cc.argmax(1)] == owner), abs=1e-9)
  share = (np.bincount(owner)[owner] - 1) / (owner.size - 1)
  assert got["c2c_chance"] == pytest.approx(100 * share.mean(), rel=1e-9)
  assert 0 < got["c2c_R@1"] < 100 and got["c2c_chance"] < got["c2c_R@1"]  # a case that can fail both ways


def test_concepts_step_labels_every_model_and_the_report_shows_the_compositions(tiny):
  wd, _, out = tiny
  data = _json(out["report"]["json"])
  md = open(out["report"]["md"]).read()
  assert "Composition of the top sets by label against the truth:" in md
  assert "Composition of the removed subspace's atoms by label against the truth:" in md
  for name, m in data["models"].items():
    cc = m["concepts"]
    assert os.path.exists(os.path.join(wd, cc["index"]))
    assert f"(../{cc['index']})" in md  # report.md / report.html link to the model's pages
    assert {"colour", "shape", "position", "template", "phrasing"} <= set(cc["truth"])
    page = _json(os.path.join(wd, name, "sae", "concepts", "concepts.json"))
    for set_name in ("S_E", "S_A", "S_B"):
      assert sum(cc["composition"][set_name].values()) == m["table1"]["set_size"]
    removal = _json(os.path.join(wd, name, "sae", "retrieval", "results.json"))["image_to_text"]
    n_atoms = removal[m["settings"]["base_variant"] + "+removal"]["settings"]["n_atoms"]
    assert sum(cc["composition"]["removed"].values()) == n_atoms == len(page["sets"]["removed"])
    assert len(page["concepts"]) == m["table1"]["c"]
    for card in page["cards"]:
      assert all(im["thumb"] for im in card["top_images"])  # the test images are on disk
      assert all(t["caption"] and not t["caption"].startswith("text row") for t in card["top_captions"])
