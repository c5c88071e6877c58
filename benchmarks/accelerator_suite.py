"""Every headline figure of the project on one accelerator, from one command; `--dry` runs the same code
at tiny sizes on CPU (tests/test_accelerator_suite.py), so the suite does not rot between lent devices.

  python -m benchmarks.accelerator_suite                       # on a GPU/TPU host, <= 5 min by default
  python -m benchmarks.accelerator_suite --dry                 # CPU, tiny sizes, ~45 s on 2 cores
  python -m benchmarks.accelerator_suite --parts=train,metrics --budget_s=600

Parts (each in its own process, so its memory peak is its own; each has a share of --budget_s and
writes what it finished before its share ran out; what did not run says why in its line):
  train      the jitted train step (sae_jax.training.step, bf16, k=64, d=4096): presets paper and modern,
             backward dense and scatter, c in {32768, 131072} x B in {4096, 16384}. Tokens/s, step time,
             the compiled program's memory (arguments + outputs + temporaries) and MFU with the stated
             FLOP count 4*B*d*c (encoder GEMM + its weight gradient) + 6*B*k*d (sparse decoder, its
             weight and code gradients), the same count for every implementation.
  peers      eai-sparsify (SparseCoder, Triton kernels on CUDA, its own bf16 autocast) and overcomplete
             TopKSAE (bf16 autocast on an accelerator) at the same shapes, torch; peak allocated memory.
  metrics    every per-concept metric + Table 1 (sae_jax.metrics) at N=1M pairs, c=131072, d=4096,
             synthetic sparse codes at the paper's k=50: wall time (jit included), peak device memory.
  retrieval  exact top-10 (sae_jax.retrieval.topk_search) of 5k queries over 1M candidates, d=4096,
             against faiss's GPU flat index where faiss-gpu imports, else torch matmul + topk on the same
             device; queries/s and the fraction of equal ids.
  extraction a Qwen2-VL-7B-shaped model (the published config's dimensions, random bf16 weights, no
             download; a small BPE tokenizer stands in for Qwen's, so text token counts differ) through
             sae_jax.stages.extract.Extractor on 224 px images with the paper's templates, mean pooling
             and token shards on: images/s, tokens/s, peak memory at batch 8 and 32.

Output: one JSON line per figure on stdout (timing lines of the workers on stderr), then
<results_dir>/<device>.json (all lines, the host, the load, versions) and <device>.md (a markdown table).
On the lent H200 (no grain, ml-collections, overcomplete or eai-sparsify there): carry wheels, see
benchmarks/README.md ("Accelerator suite").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The peers first: each sae_jax train line then carries its ratios to them when it is printed.
PARTS = ("peers", "train", "metrics", "retrieval", "extraction")
# Share of --budget_s per part (the train part compiles 16 programs).
SHARES = {"train": 0.42, "peers": 0.12, "metrics": 0.16, "retrieval": 0.10, "extraction": 0.20}
# Dense bf16 peak TFLOP/s by device kind (vendor figures, no sparsity), for MFU.
PEAK_TFLOPS = {"h200": 989.0, "h100": 989.0, "a100": 312.0, "l4": 121.0, "tpu v4": 275.0}
PEAK_TFLOPS.update({"tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0, "tpu v6 lite": 918.0})
MARK = "@@figure "

FULL = dict(
  d=4096,
  k=64,
  train_shapes=((131072, 16384), (131072, 4096), (32768, 16384), (32768, 4096)),
  variants=(("paper", "dense"), ("modern", "dense"), ("paper", "scatter"), ("modern", "scatter")),
  reps=5,
  metrics=dict(n=1_000_000, c=131072, d=4096, k=50),
  retrieval=dict(n=1_000_000, d=4096, queries=5000, k=10, chunk=1000),
  extraction=dict(batches=(8, 32), images=96),
)
DRY = dict(
  d=64,
  k=8,
  train_shapes=((512, 256),),
  variants=FULL["variants"],
  reps=2,
  metrics=dict(n=4000, c=1024, d=64, k=8),
  retrieval=dict(n=20000, d=64, queries=256, k=10, chunk=128),
  extraction=dict(batches=(2, 4), images=4),
)


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dry", action="store_true", help="tiny sizes on CPU (the test of this script)")
  p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
  p.add_argument(
    "--budget_s",
    type=float,
    default=0.0,
    help="wall-clock budget of all parts together (0 = 300 s; with --dry 1200 s, for loaded CI machines)",
  )
  p.add_argument("--results_dir", default=os.path.join(ROOT, "benchmarks", "results"))
  p.add_argument("--peak_tflops", type=float, default=0.0, help="bf16 peak for MFU (0 = by device kind)")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  p.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  unknown = set(args.parts.split(",")) - set(PARTS)
  if unknown:
    p.error(f"--parts: unknown {sorted(unknown)}; expected a subset of {PARTS}")
  return args


def _emit(record: dict) -> None:
  print(MARK + json.dumps(record), flush=True)


def _log(msg: str) -> None:
  print(f"# {msg}", file=sys.stderr, flush=True)


def _median(xs) -> float:
  xs = sorted(xs)
  n = len(xs)
  return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _host_peak_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _jax_device_peak_gib():
  """Peak bytes the process's JAX allocator held on device 0 (None on CPU, which has no stats)."""
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else round(peak / 2**30, 3)


def _out_of_time(args, figure: str, what: dict) -> bool:
  if time.time() < args.deadline:
    return False
  _emit({"figure": figure, **what, "skipped": "the part's share of --budget_s ran out before it started"})
  return True


def step_flops(batch: int, d: int, c: int, k: int) -> float:
  """FLOPs of one train step as counted for MFU: the encoder GEMM and its weight gradient (2 x 2Bdc),
  the sparse decoder and its two gradients (3 x 2Bkd)."""
  return 4.0 * batch * d * c + 6.0 * batch * k * d


# ----------------------------------------------------------------------------------------- train


def _train_data(batch: int, d: int):
  import numpy as np

  rng = np.random.default_rng(0)
  scales = np.exp(rng.normal(size=d) * 0.5).astype(np.float32)
  return (rng.standard_normal((batch, d), dtype=np.float32) * scales + 0.1).astype(np.float32)


def _time_steps(run, reps: int) -> list[float]:
  run()  # compile / first touch
  run()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return times


def _train_record(impl: str, d: int, c: int, batch: int, k: int, times, peak: float, extra: dict) -> dict:
  step_s = _median(times)
  flops = step_flops(batch, d, c, k)
  return {
    "figure": "train_step",
    "impl": impl,
    "d": d,
    "c": c,
    "batch": batch,
    "k": k,
    "median_step_s": round(step_s, 5),
    "tokens_per_s": round(batch / step_s, 1),
    "step_s": [round(t, 5) for t in times],
    "flops_per_step": flops,
    "mfu": None if not peak else round(flops / step_s / (peak * 1e12), 4),
    "peak_tflops": peak or None,
    **extra,
  }


def worker_train(args, size: dict, peak: float) -> None:
  import jax

  from benchmarks import train_throughput

  d, k = size["d"], size["k"]
  for c, batch in size["train_shapes"]:
    x_np = _train_data(batch, d)
    for preset, backward in size["variants"]:
      impl = f"sae_jax/{preset}/bfloat16/backward={backward}"
      if _out_of_time(args, "train_step", {"impl": impl, "c": c, "batch": batch}):
        continue
      try:
        t0 = time.perf_counter()
        run, info = train_throughput.sae_jax_step(
          preset, "bfloat16", "auto", d, c, k, x_np, [f"backward={backward}"]
        )
        holder, batch_arr, valid = run.args
        # Compiled ahead of time: the same executable is timed and its memory read.
        compiled = run.step.lower(holder["state"], batch_arr, valid).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()

        def step(compiled=compiled, holder=holder, batch_arr=batch_arr, valid=valid):
          holder["state"], metrics = compiled(holder["state"], batch_arr, valid)
          return float(metrics["loss"])  # blocks until the step is done

        times = _time_steps(step, size["reps"])
        program = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        program += mem.temp_size_in_bytes
        extra = {
          **info,
          "compile_s": round(compile_s, 2),
          "program_memory_gib": round(program / 2**30, 3),
          "device_peak_gib_so_far": _jax_device_peak_gib(),
          "loss_finite": math.isfinite(step()),
        }
        _emit(_train_record(impl, d, c, batch, k, times, peak, extra))
        del run, holder, compiled, step
      except Exception as e:  # pylint: disable=broad-except
        _emit({"figure": "train_step", "impl": impl, "c": c, "batch": batch, "error": _one_line(e)})
      jax.clear_caches()


def worker_peers(args, size: dict, peak: float) -> None:
  import torch

  from benchmarks import train_throughput

  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu":
    torch.set_num_threads(os.cpu_count() or 1)
  d, k = size["d"], size["k"]
  for c, batch in size["train_shapes"]:
    x_np = _train_data(batch, d)
    for impl in ("sparsify", "overcomplete"):
      if _out_of_time(args, "train_step", {"impl": impl, "c": c, "batch": batch}):
        continue
      try:
        if impl == "sparsify":
          run, info = train_throughput.sparsify_step(d, c, k, x_np, device=device)
        else:  # at its fastest: bf16 autocast where the device has bf16 matmuls
          run, info = train_throughput.overcomplete_step(d, c, k, x_np, bf16=device != "cpu", device=device)
      except SystemExit as e:  # not installed / does not import: say so and go on
        _emit({"figure": "train_step", "impl": impl, "c": c, "batch": batch, "not_run": str(e)})
        continue
      try:
        if device == "cuda":
          torch.cuda.reset_peak_memory_stats()
        times = _time_steps(run, size["reps"])
        mem = round(torch.cuda.max_memory_allocated() / 2**30, 3) if device == "cuda" else None
        extra = {**info, "device": device, "peak_allocated_gib": mem, "torch": torch.__version__}
        _emit(_train_record(impl, d, c, batch, k, times, peak, extra))
      except Exception as e:  # pylint: disable=broad-except
        _emit({"figure": "train_step", "impl": impl, "c": c, "batch": batch, "error": _one_line(e)})
      del run
      if device == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------- metrics, search


def worker_metrics(args, size: dict, peak: float) -> None:
  del peak
  from benchmarks import metrics_scale

  m = size["metrics"]
  if _out_of_time(args, "metrics", m):
    return
  t0 = time.perf_counter()
  D, image, text = metrics_scale.make_problem(m["c"], m["d"], m["k"], m["n"])
  make_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = metrics_scale.run_sparse(D, image, text, "float32")
  wall = time.perf_counter() - t0
  _emit(
    {
      "figure": "metrics",
      "impl": "sae_jax.metrics (every per-concept metric + Table 1)",
      **{key: m[key] for key in ("n", "c", "d", "k")},
      "wall_s": round(wall, 3),
      "goal_s": 60,
      "device_peak_gib": _jax_device_peak_gib(),
      "host_peak_gib": round(_host_peak_gib(), 3),
      "inputs_made_s": round(make_s, 2),
      "table1": out["table1"],
    }
  )


def _peer_search(q_np, cand, k: int, chunk: int, on_gpu: bool):
  """(name, search(q_chunk) -> ids): faiss's GPU flat index, faiss-cpu's on CPU, else torch matmul+topk."""
  import numpy as np

  try:
    import faiss
  except ImportError:
    faiss = None
  if faiss is not None and (hasattr(faiss, "StandardGpuResources") or not on_gpu):
    host = np.asarray(cand)
    if on_gpu:
      res = faiss.StandardGpuResources()
      index = faiss.GpuIndexFlatIP(res, host.shape[1])
      name = "faiss GpuIndexFlatIP"
    else:
      index = faiss.IndexFlatIP(host.shape[1])
      name = "faiss IndexFlatIP (CPU)"
    index.add(host)
    del host
    return name, lambda qc: index.search(qc, k)[1]
  import torch

  c_t = torch.from_dlpack(cand)  # the JAX buffer itself, no copy
  dev = c_t.device

  def search(qc):
    with torch.inference_mode():
      q_t = torch.from_numpy(qc).to(dev)
      ids = torch.topk(q_t @ c_t.T, k, dim=1).indices
      return ids.cpu().numpy()

  return f"torch matmul + topk ({dev.type})", search


def worker_retrieval(args, size: dict, peak: float) -> None:
  del peak
  import jax
  import jax.numpy as jnp
  import numpy as np

  from sae_jax import retrieval

  r = size["retrieval"]
  if _out_of_time(args, "retrieval", r):
    return

  @jax.jit
  def unit_rows(key):
    x = jax.random.normal(key, (r["n"], r["d"]), jnp.float32)
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)

  cand = jax.block_until_ready(unit_rows(jax.random.key(1)))  # made on the device: no 16 GB host copy
  rng = np.random.default_rng(0)
  q = rng.standard_normal((r["queries"], r["d"]), dtype=np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  on_gpu = jax.default_backend() == "gpu"
  peer_name, peer = _peer_search(q, cand, r["k"], r["chunk"], on_gpu)

  def ours(qc):
    return np.asarray(retrieval.topk_search(qc, cand, r["k"], normalize=False)[1])

  ours(q[: r["chunk"]])  # compile (the same query-block program serves every chunk)
  peer(q[: r["chunk"]])
  t = {"ours": 0.0, "peer": 0.0}
  ids = {"ours": [], "peer": []}
  for i, s in enumerate(range(0, r["queries"], r["chunk"])):
    qc = q[s : s + r["chunk"]]
    for side in ("ours", "peer") if i % 2 == 0 else ("peer", "ours"):
      t0 = time.perf_counter()
      ids[side].append((ours if side == "ours" else peer)(qc))
      t[side] += time.perf_counter() - t0
  same = float(np.mean(np.concatenate(ids["ours"]) == np.concatenate(ids["peer"])))
  ours_qps, peer_qps = r["queries"] / t["ours"], r["queries"] / t["peer"]
  _emit(
    {
      "figure": "retrieval",
      "impl": "sae_jax.retrieval.topk_search",
      "peer": peer_name,
      "n_candidates": r["n"],
      "d": r["d"],
      "queries": r["queries"],
      "k": r["k"],
      "queries_per_s": round(ours_qps, 1),
      "peer_queries_per_s": round(peer_qps, 1),
      "ratio_to_peer": round(ours_qps / peer_qps, 3),
      "ids_equal_frac": round(same, 5),
      "device_peak_gib": _jax_device_peak_gib(),
    }
  )


# ------------------------------------------------------------------------------------ extraction


def qwen2_vl_7b_config(token_ids: dict, dry: bool):
  """Qwen2-VL-7B-Instruct's published architecture (its config.json), or a tiny one of the same
  family for --dry; special-token ids from the stand-in tokenizer."""
  from transformers import Qwen2VLConfig

  if dry:
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    text.update(num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]})
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
  else:
    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28)
    text.update(num_key_value_heads=4, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4)
  text.update(vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
  text.update(tie_word_embeddings=False, bos_token_id=token_ids["<|endoftext|>"])
  text.update(eos_token_id=token_ids["<|endoftext|>"])
  vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
  return Qwen2VLConfig(
    text_config=text,
    vision_config=vision,
    image_token_id=token_ids["<|image_pad|>"],
    video_token_id=token_ids["<|video_pad|>"],
    vision_start_token_id=token_ids["<|vision_start|>"],
    vision_end_token_id=token_ids["<|vision_end|>"],
  )


def worker_extraction(args, size: dict, peak: float) -> None:
  del peak
  import torch
  from absl import logging
  from transformers import Qwen2VLModel, Qwen2VLProcessor
  from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

  from benchmarks import extract_throughput
  from configs import qwen2vl_coco
  from sae_jax import encoders
  from sae_jax.data import coco
  from sae_jax.encoders import factories, qwen_vl, tiny
  from sae_jax.stages import extract as extract_stage

  logging.set_verbosity(logging.WARNING)
  e = size["extraction"]
  if _out_of_time(args, "extraction", {"batches": list(e["batches"])}):
    return
  device = encoders.resolve_device("auto")
  _, tiny_proc = tiny.build("qwen2_vl")  # its BPE tokenizer and specials stand in for Qwen's vocabulary
  tok = tiny_proc.tokenizer
  ids = {s: tok.convert_tokens_to_ids(s) for s in factories.QWEN_SPECIALS}
  # 224 px images -> 16 x 16 patches of 14 px -> 64 merged image tokens, as the paper's inputs.
  ip = Qwen2VLImageProcessorPil(
    patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=224 * 224, max_pixels=224 * 224
  )
  processor = qwen_vl.make_processor(Qwen2VLProcessor, ip, tok)
  t0 = time.perf_counter()
  torch.manual_seed(0)
  dtype = torch.bfloat16
  with torch.device(device):
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # random weights made in bf16 on the device: no fp32 copy
    try:
      model = Qwen2VLModel(qwen2_vl_7b_config(ids, args.dry))
    finally:
      torch.set_default_dtype(default)
  build_s = time.perf_counter() - t0
  n_params = sum(p.numel() for p in model.parameters())
  tmp = tempfile.mkdtemp()
  cj, idir = extract_throughput.synthetic_coco(tmp, e["images"])
  cfg = qwen2vl_coco.get_config("")
  ex = cfg.extract
  ex.model_name = "qwen2-vl-7b-shaped (random bf16 weights)" if not args.dry else "qwen2-vl-tiny (random)"
  ex.dataset, ex.captions_json, ex.image_dir = "coco", cj, idir
  ex.eval_dataset = ""
  ex.captions_per_image = 1
  ex.pooling = ("mean",)
  ex.write_shards = True
  ex.dtype = "bfloat16"
  templates = dict(ex.templates)
  enc = encoders.encoder_class("qwen_vl")(
    model, processor, layer=-1, device=device, dtype=dtype, templates=templates, name=ex.model_name
  )
  source = coco.open_paired(ex)
  warm_cfg = cfg.copy_and_resolve_references()
  warm_cfg.extract.batch_size = max(e["batches"])
  warm_cfg.extract.max_images = max(e["batches"])
  extract_stage.Extractor(
    warm_cfg, os.path.join(tmp, "warm"), encoder=enc, source=coco.open_paired(warm_cfg.extract)
  ).run()
  for bs in e["batches"]:
    ex.batch_size = bs
    ex.chunk_size = max(bs, 64)
    if device.startswith("cuda"):
      torch.cuda.synchronize()
      torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    summary = extract_stage.Extractor(cfg, os.path.join(tmp, f"b{bs}"), encoder=enc, source=source).run()
    wall = time.perf_counter() - t0
    counts = summary["counts"]
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    _emit(
      {
        "figure": "extraction",
        "impl": "sae_jax.stages.extract.Extractor",
        "model": ex.model_name,
        "params": n_params,
        "d": enc.d,
        "device": device,
        "batch": bs,
        "images": len(source.images),
        "captions": len(source.captions),
        "image_px": 224,
        "images_per_s": round(summary["items_per_s"]["image"], 2),
        "captions_per_s": round(summary["items_per_s"]["text"], 2),
        "token_rows": counts["shard_rows"],
        "tokens_per_s": round(counts["shard_rows"] / wall, 1),
        "wall_s": round(wall, 2),
        "pooling": list(ex.pooling),
        "token_shards": True,
        "device_peak_gib": None if peak_mem is None else round(peak_mem, 3),
        "host_peak_gib": round(_host_peak_gib(), 3),
        "model_build_s": round(build_s, 1),
      }
    )
  import shutil

  shutil.rmtree(tmp, ignore_errors=True)


WORKERS = {
  "train": worker_train,
  "peers": worker_peers,
  "metrics": worker_metrics,
  "retrieval": worker_retrieval,
  "extraction": worker_extraction,
}


# ------------------------------------------------------------------------------------------ main


def _one_line(e: BaseException) -> str:
  text = f"{type(e).__name__}: {e}".strip().splitlines()
  return text[0][:300] if text else type(e).__name__


def device_name(dry: bool) -> tuple[str, str]:
  """(slug for file names, the device kind as the framework reports it)."""
  import jax

  kind = jax.devices()[0].device_kind
  slug = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or jax.default_backend()
  return (f"{jax.default_backend()}-dry" if dry else slug), kind


def peak_tflops(kind: str, given: float) -> float:
  if given:
    return given
  kind = kind.lower()
  return next((v for name, v in PEAK_TFLOPS.items() if name in kind), 0.0)


def _env(dry: bool) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # torch peers share the device with JAX
  env.setdefault("HF_HUB_OFFLINE", "1")
  if dry:
    env["JAX_PLATFORMS"] = "cpu"
    env["CUDA_VISIBLE_DEVICES"] = ""
  return env


def _run_part(part: str, args, seconds: float, peak: float) -> list[dict]:
  """Runs one part in a fresh process for `seconds` (+ a grace period to write what it has)."""
  cmd = [sys.executable, "-m", "benchmarks.accelerator_suite", f"--worker={part}"]
  cmd += [f"--deadline={time.time() + seconds}", f"--peak_tflops={peak}"] + (["--dry"] if args.dry else [])
  t0 = time.perf_counter()
  try:
    out = subprocess.run(
      cmd, cwd=ROOT, env=_env(args.dry), capture_output=True, text=True, timeout=seconds + 60
    )
    stdout, stderr, failed = out.stdout, out.stderr, out.returncode != 0
  except subprocess.TimeoutExpired as e:
    stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    failed = True
  records = [json.loads(line[len(MARK) :]) for line in stdout.splitlines() if line.startswith(MARK)]
  if failed:
    tail = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:] or ["(no stderr)"]
    records.append(
      {"figure": part, "error": f"the part stopped after {time.perf_counter() - t0:.0f} s: {tail[0][:300]}"}
    )
  for rec in records:
    rec.setdefault("part", part)
  return records


def _ratios(records: list[dict]) -> None:
  """Adds, to each sae_jax train line, its tokens/s over each peer's at the same shape."""
  peers = {}
  for r in records:
    if r.get("figure") == "train_step" and "tokens_per_s" in r and not r["impl"].startswith("sae_jax"):
      peers[(r["impl"], r["c"], r["batch"])] = r["tokens_per_s"]
  for r in records:
    if r.get("figure") == "train_step" and r.get("impl", "").startswith("sae_jax") and "tokens_per_s" in r:
      for name in ("sparsify", "overcomplete"):
        other = peers.get((name, r["c"], r["batch"]))
        r[f"ratio_to_{name}"] = None if other is None else round(r["tokens_per_s"] / other, 3)


def markdown_table(records: list[dict], device: str) -> str:
  rows = [f"Accelerator suite on **{device}** ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", ""]
  rows += ["| figure | what | value | peer / note |", "|---|---|---|---|"]
  for r in records:
    fig = r.get("figure")
    if "error" in r or "skipped" in r or "not_run" in r:
      note = r.get("error") or r.get("skipped") or r.get("not_run")
      rows.append(
        f"| {fig} | {r.get('impl', '')} c={r.get('c', '')} B={r.get('batch', '')} | not run | {note} |"
      )
    elif fig == "train_step":
      mem = r.get("program_memory_gib", r.get("peak_allocated_gib"))
      ratios = ", ".join(
        f"{r[key]}x {key[9:]}" for key in ("ratio_to_sparsify", "ratio_to_overcomplete") if r.get(key)
      )
      rows.append(
        f"| train step | {r['impl']} d={r['d']} c={r['c']} B={r['batch']} | {r['tokens_per_s']:,.0f} tok/s, "
        f"{r['median_step_s'] * 1e3:.1f} ms, MFU {r['mfu']}, {mem} GiB | {ratios} |"
      )
    elif fig == "metrics":
      rows.append(
        f"| metrics | N={r['n']:,} c={r['c']} d={r['d']} k={r['k']} | {r['wall_s']} s, "
        f"{r['device_peak_gib']} GiB device / {r['host_peak_gib']} GiB host | goal <= {r['goal_s']} s |"
      )
    elif fig == "retrieval":
      rows.append(
        f"| retrieval | top-{r['k']} of {r['queries']} queries over {r['n_candidates']:,}, d={r['d']} | "
        f"{r['queries_per_s']:,.0f} q/s | {r['peer']} {r['peer_queries_per_s']:,.0f} q/s "
        f"({r['ratio_to_peer']}x), ids equal {r['ids_equal_frac']} |"
      )
    elif fig == "extraction":
      rows.append(
        f"| extraction | {r['model']} batch {r['batch']}, {r['image_px']} px | {r['images_per_s']} images/s, "
        f"{r['tokens_per_s']:,.0f} tokens/s, {r['device_peak_gib']} GiB | mean pooling + token shards |"
      )
  return "\n".join(rows) + "\n"


def main(argv=None) -> None:
  args = _parse(argv)
  size = DRY if args.dry else FULL
  if args.worker:
    if args.dry:
      import torch

      torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    WORKERS[args.worker](args, size, args.peak_tflops)
    return
  # This process only reads the device kind: no preallocation of the device's memory here.
  os.environ.update({k: v for k, v in _env(args.dry).items() if k.startswith(("JAX_", "CUDA_", "XLA_"))})
  import jax

  from sae_jax import workdir as workdir_lib

  slug, kind = device_name(args.dry)
  peak = peak_tflops(kind, args.peak_tflops)
  if not args.dry and jax.default_backend() == "cpu":
    raise SystemExit("no accelerator: JAX sees only the CPU (run with --dry to test the suite on CPU)")
  args.budget_s = args.budget_s or (1200.0 if args.dry else 300.0)
  parts = [p for p in PARTS if p in args.parts.split(",")]
  total = sum(SHARES[p] for p in parts)
  start, load = time.time(), [round(os.getloadavg()[0], 2)]
  records: list[dict] = []
  os.makedirs(args.results_dir, exist_ok=True)
  path = os.path.join(args.results_dir, f"{slug}.json")
  for part in parts:
    left = args.budget_s - (time.time() - start)
    seconds = max(5.0, left * SHARES[part] / total)
    total -= SHARES[part]
    _log(f"{part}: {seconds:.0f} s")
    new = _run_part(part, args, seconds, peak)
    records += new
    _ratios(records)
    for rec in new:
      print(json.dumps(rec), flush=True)
    load.append(round(os.getloadavg()[0], 2))
    summary = {
      "device": kind,
      "slug": slug,
      "dry": args.dry,
      "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
      "wall_s": round(time.time() - start, 1),
      "budget_s": args.budget_s,
      "peak_tflops": peak or None,
      "mfu_flops": "4*B*d*c + 6*B*k*d per step (encoder GEMM + its weight gradient; sparse decoder + 2 gradients)",
      "loadavg_1m_after_each_part": load,
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "figures": records,
    }
    workdir_lib.atomic_write_json(path, summary)  # after every part: a killed run keeps what it measured
    workdir_lib.atomic_write_text(os.path.join(args.results_dir, f"{slug}.md"), markdown_table(records, kind))
  print(markdown_table(records, kind), file=sys.stderr)
  _log(f"wrote {path} in {time.time() - start:.0f} s")


if __name__ == "__main__":
  main()
