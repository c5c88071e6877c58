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
  sae_jax@<ref>/<preset>/<dtype>  the step of another commit (e.g. sae_jax@68f6c5e/paper/bfloat16, the
                            step before the shard_map rewrite), run in a worker process from
                            `git archive <ref>`, timed in the same rotation.
A 4th part of a sae_jax name sets the decoder (gather | dense) or, as field=value, any config.sae
field (sae_jax/paper/bfloat16/backward=dense).

Bounded time on any CPU: the GEMM rates of each framework and dtype are measured FIRST; an
implementation whose GEMM rate is below 1/--drop_factor of the fastest one is dropped before its
warm-up (e.g. torch bf16 on a CPU without avx512_bf16: 0.8 GFLOP/s), and one whose last warm-up step
takes more than --drop_factor x the fastest implementation's is dropped before the timed
repetitions; each drop prints a JSON line with the reason. A peer named in --impls that cannot be
imported is an error. Installing every peer (their pins would replace the CPU torch with a CUDA
build, hence --no-deps):

  pip install -e ".[bench]" && pip install --no-deps overcomplete==0.3.0 eai-sparsify==1.3.3 \
      && pip install einops scipy scikit-learn matplotlib simple-parsing natsort accelerate datasets schedulefree

GPU mode (`--gpu`; written for an accelerator, NOT run in this repository's sessions, unverified):
d=4096, c=32768, batches 4096 and 16384, bf16, `paper` with backward=scatter and backward=dense;
prints the step time and MFU = (matmul FLOPs of the compiled step, while bodies counted by their
trip counts: `program_stats.flops_with_trip_counts`) / step time / --peak_tflops.

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

_INSTALL = (
  "install every peer with the command in this script's docstring (python -m benchmarks.train_throughput -h)"
)
TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def _parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
  p.add_argument("--drop_factor", type=float, default=10.0, help="drop impls this many times slower")
  p.add_argument("--gpu", action="store_true", help="accelerator mode (see the docstring)")
  p.add_argument("--peak_tflops", type=float, default=989.0, help="--gpu: the device's bf16 peak")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
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


def sae_jax_step(preset: str, dtype: str, decoder: str, d: int, c: int, k: int, x_np, fields=()):
  import jax
  import jax.numpy as jnp

  from configs import base
  from sae_jax import sae as sae_lib
  from sae_jax import sharding as shard_lib

  config = base.get_config()
  config.sae.preset, config.sae.d, config.sae.c, config.sae.k = preset, d, c, k
  config.sae.compute_dtype, config.sae.decoder = dtype, decoder
  for field in fields:
    name, value = field.split("=", 1)
    if name not in config.sae:
      raise SystemExit(f"--impls: config.sae has no field {name!r} (in {field!r})")
    config.sae[name] = type(config.sae[name])(value)
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

  info = {"decoder": spec.decoder, "dtype": dtype, "framework": "jax"}
  if hasattr(spec, "backward"):
    info["backward"] = spec.backward
  run.step, run.args = step, (holder, batch, valid)
  return run, info


def _worker(args) -> None:
  """Runs in a process whose PYTHONPATH is another commit's tree: one step per line of stdin."""
  import numpy as np

  preset, dtype, decoder = args.worker.split("/")
  d, c = (int(v) for v in args.sizes.split("x"))
  rng = np.random.default_rng(0)
  scales = np.exp(rng.normal(size=d) * 0.5).astype(np.float32)
  x_np = (rng.standard_normal((int(args.batch), d), dtype=np.float32) * scales + 0.1).astype(np.float32)
  run, info = sae_jax_step(preset, dtype, decoder, d, c, args.k, x_np)
  print(json.dumps(info), flush=True)
  for _ in sys.stdin:
    print(run(), flush=True)


def _sae_jax_at(ref: str, preset: str, dtype: str, decoder: str, size: str, args, trees: dict):
  """The step of commit `ref` in a worker process; run() asks it for one step."""
  import subprocess
  import tempfile

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if ref not in trees:
    trees[ref] = tempfile.TemporaryDirectory()
    archive = subprocess.run(["git", "-C", root, "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", trees[ref].name], input=archive, check=True)
  tree = trees[ref].name
  cmd = [sys.executable, os.path.abspath(__file__), f"--worker={preset}/{dtype}/{decoder}", f"--sizes={size}"]
  cmd += [f"--k={args.k}", f"--batch={args.batch}"]
  proc = subprocess.Popen(
    cmd,
    cwd=tree,
    env={**os.environ, "PYTHONPATH": tree},
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )
  info = json.loads(proc.stdout.readline() or "{}")
  if not info:
    raise SystemExit(f"--impls: the step of {ref} did not start (see its stderr above)")

  def run():
    proc.stdin.write("step\n")
    proc.stdin.flush()
    return float(proc.stdout.readline())

  run.proc = proc
  return run, {**info, "ref": ref}


def overcomplete_step(d: int, c: int, k: int, x_np, bf16: bool, device: str = "cpu"):
  import torch

  if _bare_package("overcomplete") is None:
    raise SystemExit(f"--impls: overcomplete is not installed; {_INSTALL}")
  from overcomplete.sae.topk_sae import TopKSAE

  torch.manual_seed(0)
  model = TopKSAE(d, c, top_k=k, device=device)
  model.train()
  opt = torch.optim.Adam(model.parameters(), lr=8e-4, betas=(0.9, 0.999), eps=1e-8)
  x = torch.from_numpy(x_np).to(device)

  def run():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
      _, z, x_hat = model(x)
      loss = ((x - x_hat.float()) ** 2).mean() + 0.01 * z.float().abs().mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()

  return run, {"dtype": "bfloat16 (autocast)" if bf16 else "float32", "framework": "torch"}


def sparsify_step(d: int, c: int, k: int, x_np, device: str = "cpu"):
  import torch

  if _bare_package("sparsify") is None:
    raise SystemExit(f"--impls: sparsify (eai-sparsify) is not installed; {_INSTALL}")
  try:
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # it prints "Triton not installed ..."
      from sparsify.config import SparseCoderConfig
      from sparsify.sparse_coder import SparseCoder
  except ImportError as e:  # its trainer-side deps (simple-parsing, accelerate, natsort) missing
    raise SystemExit(f"--impls: sparsify does not import ({e}); {_INSTALL}") from None
  torch.manual_seed(0)
  # float32 parameters as its trainer; on CUDA its forward runs under its own bf16 autocast.
  sae = SparseCoder(d, SparseCoderConfig(num_latents=c, k=k), device=device, dtype=torch.float32)
  lr = 2e-4 / (c / 2**14) ** 0.5  # its trainer's default for Adam
  opt = torch.optim.Adam(sae.parameters(), lr=lr)
  x = torch.from_numpy(x_np).to(device)
  since_fired = torch.zeros(c, dtype=torch.long, device=device)
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
    did_fire = torch.zeros(c, dtype=torch.bool, device=device)
    did_fire[out.latent_indices.flatten()] = True
    since_fired += x.shape[0]
    since_fired[did_fire] = 0
    return loss.item()

  return run, {"dtype": "float32", "framework": "torch"}


def _framework_dtype(name: str) -> tuple[str, str]:
  if name.startswith("sae_jax"):
    return "jax", "bfloat16" if "/bfloat16" in name else "float32"
  return "torch", "bfloat16" if name.endswith("bf16") else "float32"


def _dropped(name: str, size: str, reason: str) -> None:
  print(json.dumps({"impl": name, "size": size, "dropped": reason}), flush=True)


def _mfu(run, step_s: float, peak_tflops: float) -> dict:
  """Matmul FLOPs of the compiled step (trip-counted) and the fraction of the device's peak."""
  from sae_jax.training import program_stats

  holder, batch, valid = run.args
  compiled = run.step.lower(holder["state"], batch, valid).compile()
  flops = program_stats.flops_with_trip_counts(compiled)
  return {
    "step_matmul_flops": flops,
    "mfu": round(flops / step_s / (peak_tflops * 1e12), 4),
    "peak_tflops": peak_tflops,
  }


def _gemm_benchmarks(batch: int, d: int, c: int, x_np, with_torch: bool = True):
  """One GEMM [batch, d] x [d, c] per framework and dtype, timed alongside the steps."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(1)
  w_np = rng.standard_normal((d, c), dtype=np.float32) / np.sqrt(d)
  out = {}
  for name, dt in (("jax/float32", jnp.float32), ("jax/bfloat16", jnp.bfloat16)):
    a, b = jnp.asarray(x_np, dt), jnp.asarray(w_np, dt)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    out[name] = lambda f=f, a=a, b=b: f(a, b).block_until_ready()
  if not with_torch:
    return out
  import torch

  for name, dt in (("torch/float32", torch.float32), ("torch/bfloat16", torch.bfloat16)):
    a, b = torch.from_numpy(x_np).to(dt), torch.from_numpy(w_np).to(dt)
    out[name] = lambda a=a, b=b: torch.mm(a, b)
  return out


# ------------------------------------------------------------------------------------- main


def _gpu_defaults(args) -> None:
  """--gpu: the accelerator comparison (sizes, batches, impls) unless given explicitly."""
  given = " ".join(sys.argv[1:])
  if "--sizes" not in given:
    args.sizes = "4096x32768"
  if "--impls" not in given:
    args.impls = "sae_jax/paper/bfloat16/backward=scatter,sae_jax/paper/bfloat16/backward=dense"


def main() -> None:
  args = _parse()
  if args.worker:
    _worker(args)
    return
  if args.gpu:
    _gpu_defaults(args)
    if "," in str(args.batch):
      raise SystemExit("--batch: one batch size per run (run --gpu --batch=4096, then --batch=16384)")
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
    # GEMM rates first: they bound what each framework/dtype can do on this CPU.
    gemms = _gemm_benchmarks(args.batch, d, c, x_np, with_torch=not args.gpu)
    gemm_rate = {}
    for name, fn in gemms.items():
      fn()
      t0 = time.perf_counter()
      fn()
      gemm_rate[name] = 2.0 * args.batch * d * c / (time.perf_counter() - t0)
    print(
      f"# {size} GEMM GFLOP/s: " + json.dumps({n: round(r / 1e9, 1) for n, r in gemm_rate.items()}),
      file=sys.stderr,
    )
    best_rate = max(gemm_rate.values())
    impls: dict = {}
    trees: dict = {}
    for name in args.impls.split(","):
      framework, dtype = _framework_dtype(name)
      rate = gemm_rate.get(f"{framework}/{dtype}", best_rate)
      if rate * args.drop_factor < best_rate:
        _dropped(
          name,
          size,
          f"{framework} {dtype} GEMM at {rate / 1e9:.1f} GFLOP/s is below 1/{args.drop_factor:g} of the fastest GEMM ({best_rate / 1e9:.1f})",
        )
        continue
      if name.startswith("sae_jax@"):
        ref, preset, dtype, *decoder = name[len("sae_jax@") :].split("/")
        made = _sae_jax_at(ref, preset, dtype, (decoder or [args.decoder])[0], size, args, trees)
      elif name.startswith("sae_jax/"):
        _, preset, dtype, *extra = name.split("/")
        fields = [e for e in extra if "=" in e]
        decoder = ([e for e in extra if "=" not in e] or [args.decoder])[0]
        made = sae_jax_step(preset, dtype, decoder, d, c, args.k, x_np, fields)
      elif name in ("overcomplete", "overcomplete_bf16"):
        made = overcomplete_step(d, c, args.k, x_np, bf16=name.endswith("bf16"))
      elif name == "sparsify":
        made = sparsify_step(d, c, args.k, x_np)
      else:
        raise SystemExit(f"--impls: unknown implementation {name!r}")
      impls[name] = made
    warm = {}
    for name, (run, _) in impls.items():  # compile / first-touch; the last warm-up step is timed
      t0 = time.perf_counter()
      for _ in range(max(args.warmup, 1)):
        t1 = time.perf_counter()
        run()
      warm[name] = time.perf_counter() - t1
      print(f"# {size} {name}: warmup {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    fastest = min(warm.values())
    for name, seconds in warm.items():
      if seconds > args.drop_factor * fastest:
        _dropped(
          name, size, f"warm-up step {seconds:.2f} s > {args.drop_factor:g} x the fastest ({fastest:.2f} s)"
        )
        del impls[name]
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
    old = {n: m for n, m in medians.items() if n.startswith("sae_jax@")}
    for name, (_, info) in impls.items():
      tok_s = args.batch / medians[name]
      dtype_key = "bfloat16" if info["dtype"].startswith("bfloat16") else "float32"
      rate = gemm_rate[f"{info['framework']}/{dtype_key}"]
      floor_s = 4.0 * args.batch * d * c / rate
      if args.gpu and hasattr(impls[name][0], "step"):
        info = {**info, **_mfu(impls[name][0], medians[name], args.peak_tflops)}
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
        "ratio_to_ref_steps": {n: round(m / medians[name], 3) for n, m in old.items()},
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
    for run, _ in impls.values():
      if hasattr(run, "proc"):
        run.proc.stdin.close()
        run.proc.wait(timeout=60)
    del impls, gemms


if __name__ == "__main__":
  main()
