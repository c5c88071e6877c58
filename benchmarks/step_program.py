"""The train step as a compiled program on 8 fake CPU devices (compile only; the CPU proxy for a pod).

For each case it compiles `sae_jax.training.step.jit_train_step` and prints one JSON line:
collectives (count, how many inside while loops, bytes per step with loop trip counts), scatters
(all, and those whose operand is [c, d]-sized per device), temp / argument bytes per device from
`compiled.memory_analysis()`, and matmul FLOPs with while bodies counted by their trip counts.

  python benchmarks/step_program.py                      # this tree; d=4096, c=32768, k=50
  python benchmarks/step_program.py --ref=68f6c5e        # the step of another commit (git archive)
  python benchmarks/step_program.py --batches=4096 --meshes=8x1 --presets=modern --backwards=dense

Each case compiles in its own subprocess (XLA_FLAGS fakes the devices before jax is imported).
Commits before `sae.backward` existed have one backward (scatter-adds); there "dense" means
`sae.decoder=dense`, their only dense knob. Cost: ~20-60 s of compile per case on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _case(args: argparse.Namespace) -> dict:
  """Runs inside the subprocess: compile one case and read the program."""
  import inspect

  import jax
  import jax.numpy as jnp
  import ml_collections
  import optax

  from sae_jax import sae as sae_lib
  from sae_jax import sharding as shard_lib
  from sae_jax.training import program_stats
  from sae_jax.training import state as state_lib
  from sae_jax.training import step as step_lib

  data, model = (int(v) for v in args.mesh.split("x"))
  d, c, k, batch = args.d, args.c, args.k, args.batch
  cfg = ml_collections.ConfigDict(dict(data=data, model=model))
  mesh = shard_lib.make_mesh(cfg, jax.devices()[: data * model])
  fields = {f.name for f in dataclasses.fields(sae_lib.SAESpec)}
  base = dict(d=d, c=c, k=k, preset=args.preset, compute_dtype=args.dtype)
  if args.preset == "modern":
    base.update(
      pre_bias=True, enc_init="tied", decoder_norm="unit_grad", l1_coef=0.0, aux_k=d // 2, aux_coef=1 / 32
    )
  else:
    base.update(l1_coef=0.01)
  if "backward" in fields:
    base.update(backward=args.backward, decoder="gather" if args.backward == "scatter" else "dense")
  else:
    base.update(decoder="gather" if args.backward == "scatter" else "dense")
  spec = sae_lib.SAESpec(**base)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(8e-4))
  abstract = jax.eval_shape(
    lambda: state_lib.init_state(sae_lib.init_params(jax.random.key(0), spec), optimizer)
  )
  zero = bool(args.shard_optimizer)
  if "shard_optimizer" in inspect.signature(step_lib.jit_train_step).parameters:
    sharding = shard_lib.state_shardings(abstract, mesh, zero)
    step = step_lib.jit_train_step(spec, optimizer, mesh, sharding, zero)
  else:
    zero = False
    sharding = shard_lib.state_shardings(abstract, mesh)
    step = step_lib.jit_train_step(spec, optimizer, mesh, sharding)
  compiled = step.lower(
    abstract, jax.ShapeDtypeStruct((batch, d), jnp.float32), jax.ShapeDtypeStruct((batch,), jnp.float32)
  ).compile()
  stats = program_stats.program_stats(compiled)
  summary = stats.to_json()
  mem = compiled.memory_analysis()
  cd = d * c // model
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dict(
    preset=args.preset,
    backward=args.backward,
    decoder=spec.decoder,
    dtype=args.dtype,
    shard_optimizer=zero,
    mesh=[data, model],
    d=d,
    c=c,
    k=k,
    batch=batch,
    collectives=summary["collectives"],
    collectives_in_loops=summary["collectives_in_loops"],
    collective_bytes_per_step=summary["collective_bytes_per_step"],
    gradient_bytes=4 * (2 * cd + c // model + d),
    scatters=summary["scatters"],
    scatters_cd=sum(1 for _, shape, _ in stats.scatters if _prod(shape) >= cd),
    temp_bytes=int(mem.temp_size_in_bytes),
    argument_bytes=int(mem.argument_size_in_bytes),
    flops_trip_counted=program_stats.flops_with_trip_counts(compiled),
    flops_cost_analysis=float(cost.get("flops", -1.0)),
  )


def _prod(shape) -> int:
  out = 1
  for s in shape:
    out *= int(s)
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ref", default="", help="a git commit whose step to compile (default: this tree)")
  p.add_argument("--d", type=int, default=4096)
  p.add_argument("--c", type=int, default=32768)
  p.add_argument("--k", type=int, default=50)
  p.add_argument("--batches", default="4096,16384")
  p.add_argument("--meshes", default="8x1,4x2")
  p.add_argument("--presets", default="paper,modern")
  p.add_argument("--backwards", default="scatter,dense")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--shard_optimizer", action="store_true")
  p.add_argument("--timeout", type=int, default=900, help="seconds per case")
  p.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--mesh", default="", help=argparse.SUPPRESS)
  p.add_argument("--preset", default="", help=argparse.SUPPRESS)
  p.add_argument("--backward", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.case:
    print(json.dumps(_case(args)), flush=True)
    return
  tree = ROOT
  tmp = None
  if args.ref:
    tmp = tempfile.TemporaryDirectory()
    archive = subprocess.run(["git", "-C", ROOT, "archive", args.ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", tmp.name], input=archive, check=True)
    tree = tmp.name
  env = {**os.environ, "PYTHONPATH": tree, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  for batch in args.batches.split(","):
    for mesh in args.meshes.split(","):
      for preset in args.presets.split(","):
        for backward in args.backwards.split(","):
          cmd = [sys.executable, os.path.abspath(__file__), "--case", f"--batch={batch}", f"--mesh={mesh}"]
          cmd += [f"--preset={preset}", f"--backward={backward}", f"--d={args.d}", f"--c={args.c}"]
          cmd += [f"--k={args.k}", f"--dtype={args.dtype}"] + (
            ["--shard_optimizer"] if args.shard_optimizer else []
          )
          r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=tree)
          if r.returncode != 0:
            raise SystemExit(f"case batch={batch} mesh={mesh} {preset}/{backward} failed: {r.stderr[-2000:]}")
          line = json.loads(r.stdout.strip().splitlines()[-1])
          line["ref"] = args.ref or "HEAD+worktree"
          print(json.dumps(line), flush=True)


if __name__ == "__main__":
  main()
