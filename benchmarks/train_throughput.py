"""Tokens/s of one full Top-K SAE training step: sae-jax against its peers, interleaved in one run.

  python -m benchmarks.train_throughput                       # d=768/c=7168 and d=2048/c=16384
  python -m benchmarks.train_throughput --sizes=768x7168 --reps=7
  python -m benchmarks.train_throughput --malloc=default      # glibc's default allocator settings

Implementations (all one full step: forward, backward, optimizer, per-step bookkeeping):
  sae_jax/<preset>/<dtype>[/<decoder>]  the real jitted step of `sae_jax.training.step.jit_train_step` (clip, Adam, renorm
                            or parallel-gradient removal, dead-latent counters, metrics), donated state.
  overcomplete              overcomplete==0.3.0 TopKSAE with the authors' recipe: MSE + 0.01 mean|z|,
                            clip_grad_norm_(1.0), torch Adam(8e-4), float32 (their training dtype).
  overcomplete_bf16         the same under torch.autocast("cpu", bfloat16): the peer at its fastest.
  sparsify                  eai-sparsify SparseCoder (fused sparse encoder backward, embedding_bag
                            decoder; eager on CPU), its trainer's step: fvu + auxk/32, parallel-gradient
                            removal, Adam, unit-norm decoder, dead-latent counters, float32.
Every repetition runs one timed step of each implementation, in a rotating order, so load from
other processes falls on all of them alike. Prints one JSON line per implementation and size.

Other processes on the machine slow every implementation (multi-threaded GEMMs most): each line
records the 1-minute load average at the start and end of the timed repetitions.
Allocator: with --malloc=tuned (default) the script re-executes itself with MALLOC_MMAP_MAX_=0 and
trimming off, which keeps glibc from mapping/unmapping torch's GB-scale buffers every step (minor
page faults); XLA allocates its own memory and is not affected. torch runs with 2 threads (= cores).
FLOP floor: 4*batch*d*c FLOPs (the encoder GEMM and one more of the same size) at the GEMM rate
measured in this run for the implementation's framework and dtype.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import types

from sae_jax.training import state as state_lib
from sae_jax.training import step as step_lib

TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="768x7168,2048x16384", help="comma-separated DxC")
  p.add_argument("--k", type=int, default=50)
  p.add_argument("--batch", type=int, default=4096)
  p.add_argument("--reps", type=int, default=5, help="timed steps per implementation and size")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument(
    "--impls",
    default="sae_jax/modern/bfloat16,sae_jax/paper/bfloat16,sae_jax/paper/float32,"
    "overcomplete,overcomplete_bf16,sparsify",
  )
  p.add_argument("--decoder", default="auto", help="sae_jax decoder: auto | dense | gather")
  p.add_argument("--malloc", default="tuned", choices=("tuned", "default"))
  p.add_argument("--threads", type=int, default=0, help="torch threads (0 = os.cpu_count())")
  return p.parse_args()


def _maybe_reexec(args) -> None:
  if args.malloc == "tuned" and any(os.environ.get(k) != v for k, v in TUNED_MALLOC.items()):
    os.environ.update(TUNED_MALLOC)
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.train_throughput", *sys.argv[1:]])


def _bare_package(name: str):
  """Imports submodules of `name` without running its __init__ (overcomplete's imports torchvision,
  sparsify's imports its trainer's dependencies)."""
  if name not in sys.modules:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
      return None
    module = types.ModuleType(name)
    module.__path__ = list(spec.submodule_search_locations)
    sys.modules[name] = module
  return sys.modules[name]


# ------------------------------------------------------------------------------ implementations


def _sae_jax(preset: str, dtype: str, decoder: str, d: int, c: int, k: int, x_np):
  import jax
  import jax.numpy as jnp

  from configs import base
  from sae_jax import sae as sae_lib
  from sae_jax import sharding as shard_lib

  config = base.get_config()
  config.sae.preset, config.sae.d, config.sae.c, config.sae.k = preset, d, c, k
  config.sae.compute_dtype, config.sae.decoder = dtype, decoder
  config.data.batch_size = x_np.shape[0]
  spec = sae_lib.spec_from_config(config.sae)
  optimizer = state_lib.make_optimizer(config.optim, int(config.train.num_steps))
  mesh = shard_lib.make_mesh(config.mesh, jax.devices()[:1])
  abstract = state_lib.abstract_state(spec, config)
  shardings = shard_lib.state_shardings(abstract, mesh)
  step = step_lib.jit_train_step(spec, optimizer, mesh, shardings)
  params = sae_lib.init_params(jax.random.key(0), spec, x_np[:2048] if spec.pre_bias else None)
  holder = {"state": jax.device_put(state_lib.init_state(params, optimizer), shardings)}
  batch = jax.device_put(jnp.asarray(x_np), shard_lib.batch_sharding(mesh))
  valid = jnp.ones((x_np.shape[0],), jnp.bool_)

  def run():
    holder["state"], metrics = step(holder["state"], batch, valid)
    return float(metrics["loss"])  # blocks until the step is done

  return run, {"decoder": spec.decoder, "dtype": dtype, "framework": "jax"}


def _overcomplete(d: int, c: int, k: int, x_np, bf16: bool):
  import torch

  if _bare_package("overcomplete") is None:
    return None
  from overcomplete.sae.topk_sae import TopKSAE

  torch.manual_seed(0)
  model = TopKSAE(d, c, top_k=k)
  model.train()
  opt = torch.optim.Adam(model.parameters(), lr=8e-4, betas=(0.9, 0.999), eps=1e-8)
  x = torch.from_numpy(x_np)

  def run():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      _, z, x_hat = model(x)
      loss = ((x - x_hat.float()) ** 2).mean() + 0.01 * z.float().abs().mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()

  return run, {"dtype": "bfloat16 (autocast)" if bf16 else "float32", "framework": "torch"}


def _sparsify(d: int, c: int, k: int, x_np):
  import torch

  if _bare_package("sparsify") is None:
    return None
  try:
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # it prints "Triton not installed ..."
      from sparsify.config import SparseCoderConfig
      from sparsify.sparse_coder import SparseCoder
  except ImportError as e:  # its trainer-side deps (simple-parsing, accelerate, natsort) missing
    print(f"# sparsify skipped: {e}", file=sys.stderr)
    return None
  torch.manual_seed(0)
  sae = SparseCoder(d, SparseCoderConfig(num_latents=c, k=k), device="cpu", dtype=torch.float32)
  lr = 2e-4 / (c / 2**14) ** 0.5  # its trainer's default for Adam
  opt = torch.optim.Adam(sae.parameters(), lr=lr)
  x = torch.from_numpy(x_np)
  since_fired = torch.zeros(c, dtype=torch.long)
  dead_threshold = 10_000_000

  def run():
    nonlocal since_fired
    out = sae(x, dead_mask=since_fired > dead_threshold)
    loss = out.fvu + out.auxk_loss / 32
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sae.set_decoder_norm_to_unit_norm()
    did_fire = torch.zeros(c, dtype=torch.bool)
    did_fire[out.latent_indices.flatten()] = True
    since_fired += x.shape[0]
    since_fired[did_fire] = 0
    return loss.item()

  return run, {"dtype": "float32", "framework": "torch"}


def _gemm_benchmarks(batch: int, d: int, c: int, x_np):
  """One GEMM [batch, d] x [d, c] per framework and dtype, timed alongside the steps."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  rng = np.random.default_rng(1)
  w_np = rng.standard_normal((d, c), dtype=np.float32) / np.sqrt(d)
  out = {}
  for name, dt in (("jax/float32", jnp.float32), ("jax/bfloat16", jnp.bfloat16)):
    a, b = jnp.asarray(x_np, dt), jnp.asarray(w_np, dt)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    out[name] = lambda f=f, a=a, b=b: f(a, b).block_until_ready()
  for name, dt in (("torch/float32", torch.float32), ("torch/bfloat16", torch.bfloat16)):
    a, b = torch.from_numpy(x_np).to(dt), torch.from_numpy(w_np).to(dt)
    out[name] = lambda a=a, b=b: torch.mm(a, b)
  return out


# ------------------------------------------------------------------------------------- main


def main() -> None:
  args = _parse()
  _maybe_reexec(args)
  sizes = args.sizes.split(",")
  if len(sizes) > 1:
    # One process per size: with trimming off glibc never returns freed memory, and all the
    # implementations of both sizes in one process exceeded 12 GB (OOM-killed on a 23 GB VM).
    import subprocess

    argv, rest = sys.argv[1:], []
    while argv:
      a = argv.pop(0)
      if a == "--sizes":
        argv.pop(0)
      elif not a.startswith("--sizes="):
        rest.append(a)
    for size in sizes:
      subprocess.run(
        [sys.executable, "-m", "benchmarks.train_throughput", f"--sizes={size}", *rest], check=True
      )
    return
  import jax
  import numpy as np
  import torch

  threads = args.threads or os.cpu_count()
  torch.set_num_threads(threads)
  allocator = {k: os.environ.get(k, "(unset)") for k in TUNED_MALLOC}
  for size in sizes:
    d, c = (int(v) for v in size.lower().split("x"))
    rng = np.random.default_rng(0)
    # Anisotropic, non-centred rows (like residual-stream activations), fixed across steps.
    scales = np.exp(rng.normal(size=d) * 0.5).astype(np.float32)
    x_np = (rng.standard_normal((args.batch, d), dtype=np.float32) * scales + 0.1).astype(np.float32)
    impls: dict = {}
    for name in args.impls.split(","):
      if name.startswith("sae_jax/"):
        _, preset, dtype, *decoder = name.split("/")  # optional 4th part: the decoder
        made = _sae_jax(preset, dtype, (decoder or [args.decoder])[0], d, c, args.k, x_np)
      elif name in ("overcomplete", "overcomplete_bf16"):
        made = _overcomplete(d, c, args.k, x_np, bf16=name.endswith("bf16"))
      elif name == "sparsify":
        made = _sparsify(d, c, args.k, x_np)
      else:
        raise SystemExit(f"--impls: unknown implementation {name!r}")
      if made is None:
        print(f"# {name} skipped: package not installed", file=sys.stderr)
        continue
      impls[name] = made
    gemms = _gemm_benchmarks(args.batch, d, c, x_np)
    for name, (run, _) in impls.items():  # compile / first-touch
      t0 = time.perf_counter()
      for _ in range(args.warmup):
        run()
      print(f"# {size} {name}: warmup {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    for fn in gemms.values():
      fn()
    load_before = os.getloadavg()[0]
    times = {name: [] for name in impls}
    gemm_times = {name: [] for name in gemms}
    order = list(impls)
    for rep in range(args.reps):
      rotated = order[rep % len(order) :] + order[: rep % len(order)]
      for name in rotated:
        t0 = time.perf_counter()
        impls[name][0]()
        times[name].append(time.perf_counter() - t0)
      for name, fn in gemms.items():
        t0 = time.perf_counter()
        fn()
        gemm_times[name].append(time.perf_counter() - t0)
      print(
        f"# {size} rep {rep}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in rotated),
        file=sys.stderr,
        flush=True,
      )
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    gemm_flops = 2.0 * args.batch * d * c
    gemm_rate = {n: gemm_flops / float(np.median(t)) for n, t in gemm_times.items()}
    medians = {n: float(np.median(t)) for n, t in times.items()}
    ref = medians.get("overcomplete")
    for name, (_, info) in impls.items():
      tok_s = args.batch / medians[name]
      dtype_key = "bfloat16" if info["dtype"].startswith("bfloat16") else "float32"
      rate = gemm_rate[f"{info['framework']}/{dtype_key}"]
      floor_s = 4.0 * args.batch * d * c / rate
      record = {
        "impl": name,
        "d": d,
        "c": c,
        "k": args.k,
        "batch": args.batch,
        **info,
        "median_tokens_per_s": round(tok_s, 1),
        "median_step_s": round(medians[name], 4),
        "step_s": [round(t, 4) for t in times[name]],
        "ratio_to_overcomplete": round(ref / medians[name], 3) if ref else None,
        "gemm_gflops": round(rate / 1e9, 1),
        "flop_floor_s": round(floor_s, 4),
        "fraction_of_floor": round(floor_s / medians[name], 3),
        "allocator": allocator,
        "torch_threads": threads,
        "loadavg_1min_start_end": load,
        "jax": jax.__version__,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
      }
      print(json.dumps(record), flush=True)
    print(
      json.dumps(
        {
          "gemm_gflops": {n: round(r / 1e9, 1) for n, r in gemm_rate.items()},
          "d": d,
          "c": c,
          "batch": args.batch,
        }
      ),
      flush=True,
    )
    del impls, gemms


if __name__ == "__main__":
  main()
