"""The train step on 8 fake CPU devices, read as a compiled program and run against one device.

Each test runs this file as a script in ONE subprocess (XLA_FLAGS must fake the devices before jax
is imported), which compiles or runs every case and prints one JSON object per line:

  python tests/test_step_program.py program    # optimized-HLO statistics per mesh / mode / preset
  python tests/test_step_program.py equality   # final states after 10 steps per mesh / mode / preset
  python tests/test_step_program.py zero       # per-device argument bytes, ZeRO-1 vs replicated
"""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))
D, C, K, B = 64, 512, 8, 256  # program shapes: small, so compiling all cases stays quick
C_TIES = 64  # dictionary size of the tie test


def _spec(preset, backward, d, c, k, **kw):
  from sae_jax import sae as sae_lib

  fields = dict(d=d, c=c, k=k, preset=preset, backward=backward, decoder="dense")
  if preset == "modern":
    fields.update(
      pre_bias=True,
      b_dec_init="zeros",
      enc_init="tied",
      decoder_norm="unit_grad",
      l1_coef=0.0,
      aux_k=d // 2,
      aux_coef=1 / 32,
    )
  if backward == "scatter":
    fields["decoder"] = "gather"
  fields.update(kw)
  names = {f.name for f in dataclasses.fields(sae_lib.SAESpec)}
  return sae_lib.SAESpec(**{k: v for k, v in fields.items() if k in names})


def _mesh(data, model):
  import jax
  import ml_collections

  from sae_jax import sharding as shard_lib

  n = data * model
  return shard_lib.make_mesh(ml_collections.ConfigDict(dict(data=data, model=model)), jax.devices()[:n])


def _jitted(spec, mesh, shard_optimizer=False):
  """(jitted step, abstract state); works with the step of any commit (old signatures too)."""
  import inspect

  import jax
  import optax

  from sae_jax import sae as sae_lib
  from sae_jax import sharding as shard_lib
  from sae_jax.training import state as state_lib
  from sae_jax.training import step as step_lib

  clip = getattr(state_lib, "clip_by_global_norm", optax.clip_by_global_norm)  # older commits: optax's
  optimizer = optax.chain(clip(1.0), optax.adam(1e-3))
  abstract = jax.eval_shape(
    lambda: state_lib.init_state(sae_lib.init_params(jax.random.key(0), spec), optimizer)
  )
  if "shard_optimizer" in inspect.signature(step_lib.jit_train_step).parameters:
    sharding = shard_lib.state_shardings(abstract, mesh, shard_optimizer)
    return step_lib.jit_train_step(spec, optimizer, mesh, sharding, shard_optimizer), abstract, optimizer
  sharding = shard_lib.state_shardings(abstract, mesh)
  return step_lib.jit_train_step(spec, optimizer, mesh, sharding), abstract, optimizer


def _compile(spec, mesh, batch, shard_optimizer=False):
  import jax
  import jax.numpy as jnp

  step, abstract, _ = _jitted(spec, mesh, shard_optimizer)
  args = (
    abstract,
    jax.ShapeDtypeStruct((batch, spec.d), jnp.float32),
    jax.ShapeDtypeStruct((batch,), jnp.float32),
  )
  return step.lower(*args).compile()


def main_program():
  from sae_jax.training import program_stats

  for preset in ("paper", "modern"):
    for backward in ("scatter", "dense"):
      for data, model in ((8, 1), (4, 2), (2, 4)):
        spec = _spec(preset, backward, D, C, K)
        compiled = _compile(spec, _mesh(data, model), B)
        stats = program_stats.program_stats(compiled)
        text = compiled.as_text()
        record = dict(
          preset=preset,
          backward=backward,
          mesh=[data, model],
          scalar_sqrts=text.count("= f32[] sqrt("),  # gradient norms (row norms are not scalars)
          in_loops=len(stats.collectives_in_loops()),
          bytes_per_step=stats.collective_bytes_per_step(),
          scatter_shapes=[list(s) for _, s, _ in stats.scatters],
          aux_k=spec.aux_k,
        )
        print(json.dumps(record), flush=True)


def main_equality():
  """10 steps of every case; prints the final parameters and counters."""
  import jax
  import jax.numpy as jnp

  from sae_jax import sae as sae_lib
  from sae_jax.training import state as state_lib

  d, c, k, b, steps = 16, 64, 4, 64, 10
  rng = np.random.default_rng(0)
  atoms = rng.standard_normal((32, d)).astype(np.float32)
  batches = []
  for _ in range(steps):
    codes = rng.exponential(size=(b, 32)) * (rng.random((b, 32)) < 0.15)
    batches.append((codes @ atoms + 0.05 * rng.standard_normal((b, d)) + 0.3).astype(np.float32))
  valid = np.ones((b,), np.float32)
  valid[5] = 0.0  # a masked row
  # 4 latents start dead, so AuxK (modern) runs from the first step, weighed min(4 / 8, 1).
  since = np.where(np.arange(c) % 16 == 1, 10**6, 0).astype(np.int32)
  cases = [
    (p, bw, m, False) for p in ("paper", "modern") for bw in ("scatter", "dense") for m in ((1, 1),) + MESHES
  ]
  cases += [("paper", "scatter", (4, 2), True), ("modern", "dense", (4, 2), True)]
  for preset, backward, (data, model), zero in cases:
    spec = _spec(preset, backward, d, c, k, dead_tokens=10**5)
    mesh = _mesh(data, model)
    step, abstract, optimizer = _jitted(spec, mesh, zero)
    params = sae_lib.init_params(jax.random.key(1), spec)
    state = state_lib.init_state(params, optimizer)
    state = {**state, "tokens_since_fired": jnp.asarray(since)}
    auxes = []
    for x in batches:
      state, metrics = step(state, jnp.asarray(x), jnp.asarray(valid))
      auxes.append(float(metrics["aux_loss"]))
    out = {k_: np.asarray(v).tolist() for k_, v in state["params"].items()}
    out["tokens_since_fired"] = np.asarray(state["tokens_since_fired"]).tolist()
    out["mu_W_enc"] = np.asarray(state["opt_state"][1][0].mu["W_enc"]).tolist()
    record = dict(preset=preset, backward=backward, mesh=[data, model], zero=zero, aux=auxes, state=out)
    print(json.dumps(record), flush=True)


def main_ties():
  """One step where every latent has an exact twin (W_enc columns and b_enc duplicated) and k is
  odd, so the k-th value of every row is tied: the winners must be the lower-index twins on every
  mesh and in both backward modes (the dense mode ranks ties; a model shard may hold either twin)."""
  import jax
  import jax.numpy as jnp

  from sae_jax import sae as sae_lib
  from sae_jax.training import state as state_lib

  d, c, k, b = 16, 64, 5, 64
  x = np.random.default_rng(2).standard_normal((b, d)).astype(np.float32) + 0.2
  for backward in ("scatter", "dense"):
    for data, model in ((1, 1), (2, 4), (1, 8), (4, 2)):
      spec = _spec("paper", backward, d, c, k)
      step, _, optimizer = _jitted(spec, _mesh(data, model))
      params = sae_lib.init_params(jax.random.key(3), spec)
      W = params["W_enc"].at[:, c // 2 :].set(params["W_enc"][:, : c // 2])
      bias = params["b_enc"].at[c // 2 :].set(params["b_enc"][: c // 2])
      state = state_lib.init_state({**params, "W_enc": W, "b_enc": bias}, optimizer)
      state, metrics = step(state, jnp.asarray(x), jnp.ones((b,), jnp.float32))
      out = {k_: np.asarray(v).tolist() for k_, v in state["params"].items()}
      out["tokens_since_fired"] = np.asarray(state["tokens_since_fired"]).tolist()
      print(
        json.dumps(dict(backward=backward, mesh=[data, model], l0=float(metrics["l0"]), state=out)),
        flush=True,
      )


def main_zero():
  """Per-device argument bytes of the compiled step, replicated vs ZeRO-1 Adam moments."""
  import jax

  d, c = 256, 1024
  for data, model in ((8, 1), (4, 2)):
    for zero in (False, True):
      spec = _spec("paper", "dense", d, c, 16)
      mem = _compile(spec, _mesh(data, model), 256, zero).memory_analysis()
      # Per-device bytes of the moments alone: from the state's shardings.
      step, abstract, _ = _jitted(spec, _mesh(data, model), zero)
      from sae_jax import sharding as shard_lib

      shardings = shard_lib.state_shardings(abstract, _mesh(data, model), zero)
      moment_bytes = sum(
        int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
        for x, s in zip(jax.tree.leaves(abstract["opt_state"]), jax.tree.leaves(shardings["opt_state"]))
      )
      record = dict(
        mesh=[data, model],
        zero=zero,
        argument_bytes=int(mem.argument_size_in_bytes),
        moment_bytes=moment_bytes,
        param_bytes=4 * (2 * d * c // model + c // model + d),
      )
      print(json.dumps(record), flush=True)


# ------------------------------------------------------------------------------ tests


def _run(mode):
  env = {
    **os.environ,
    "PYTHONPATH": ROOT,
    "HF_HUB_OFFLINE": "1",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
  }
  r = subprocess.run(
    [sys.executable, os.path.abspath(__file__), mode],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def program_records():
  return _run("program")


def _activation_bytes(rec):
  """Collective bytes per step that are not gradients, per device, from the shapes:
  x_hat (and the AuxK reconstruction) psum'd over "model" [B/dp, d]; the candidate values
  all-gathered over "model" [B/dp, m*k] (and [B/dp, m*k_aux]); a few [d] and [c/m] vectors
  (input sums, AuxK residual mean, b_dec gradient, fired counts) and 64 scalars."""
  dp, mp = rec["mesh"]
  rows = B // dp
  term = 4 * (4 * D + C // mp + 64)
  if mp > 1:
    aux_k = min(rec["aux_k"], C // mp)
    term += 4 * rows * (D * (2 if rec["aux_k"] else 1) + mp * (K + (aux_k if rec["aux_k"] else 0)))
  return term


def test_no_collective_inside_a_loop(program_records):
  assert len(program_records) == 12
  for rec in program_records:
    assert rec["in_loops"] == 0, rec


def test_one_gradient_norm_per_step(program_records):
  # The metric's norm feeds the clip: one scalar sqrt (two before, with sharded gradients).
  assert all(rec["scalar_sqrts"] == 1 for rec in program_records), [
    r["scalar_sqrts"] for r in program_records
  ]


def test_collective_bytes_are_about_the_gradient_size(program_records):
  for rec in program_records:
    dp, mp = rec["mesh"]
    grad_bytes = 4 * (2 * D * C // mp + C // mp + D)
    bound = 1.5 * grad_bytes + _activation_bytes(rec)
    assert rec["bytes_per_step"] <= bound, (
      rec["preset"],
      rec["backward"],
      rec["mesh"],
      rec["bytes_per_step"],
      bound,
    )
    # ... and it is at least the gradient all-reduce itself (the bound is not vacuous).
    assert rec["bytes_per_step"] >= grad_bytes, rec


def test_dense_backward_has_no_dictionary_sized_scatter(program_records):
  dense = [r for r in program_records if r["backward"] == "dense"]
  scatter = [r for r in program_records if r["backward"] == "scatter"]
  assert len(dense) == 6
  for rec in dense:
    big = [s for s in rec["scatter_shapes"] if int(np.prod(s)) >= D * C // rec["mesh"][1]]
    assert not big, rec
  # The scatter backward does scatter [c, d]-sized accumulators: the check can see them.
  assert all(any(int(np.prod(s)) >= D * C // r["mesh"][1] for s in r["scatter_shapes"]) for r in scatter)


def test_meshes_and_backward_modes_equal_one_device():
  records = _run("equality")
  by = {(r["preset"], r["backward"], tuple(r["mesh"]), r["zero"]): r for r in records}
  assert len(by) == 2 * 2 * 5 + 2
  for (preset, backward, mesh, zero), rec in by.items():
    ref = by[(preset, "scatter", (1, 1), False)]
    if preset == "modern":
      assert rec["aux"][0] > 0, rec["aux"]  # AuxK ran (weighed 1/2) until the dead latents fired
    for name, value in rec["state"].items():
      np.testing.assert_allclose(
        np.asarray(value),
        np.asarray(ref["state"][name]),
        rtol=2e-5,
        atol=2e-6,
        err_msg=f"{preset} {backward} {mesh} {zero} {name}",
      )
    np.testing.assert_allclose(rec["aux"], ref["aux"], rtol=1e-5)


def test_tied_activations_pick_the_lower_index_on_every_mesh():
  records = _run("ties")
  assert len(records) == 8
  ref = records[0]
  assert (ref["backward"], ref["mesh"]) == ("scatter", [1, 1])
  # Ties go to the lower index: a latent whose upper twin fired fired itself, and the split pair of
  # some rows left upper twins that never fired beside lower ones that did.
  since = np.asarray(ref["state"]["tokens_since_fired"])
  lower, upper = since[: C_TIES // 2] == 0, since[C_TIES // 2 :] == 0
  assert np.all(lower[upper]) and np.any(lower & ~upper)
  for rec in records:
    assert rec["l0"] == pytest.approx(5.0), rec["l0"]
    for name, value in rec["state"].items():
      np.testing.assert_allclose(
        np.asarray(value),
        np.asarray(ref["state"][name]),
        rtol=2e-5,
        atol=2e-6,
        err_msg=f"{rec['backward']} {rec['mesh']} {name}",
      )


def test_zero1_divides_optimizer_bytes_by_the_data_axis():
  records = {(tuple(r["mesh"]), r["zero"]): r for r in _run("zero")}
  for mesh in ((8, 1), (4, 2)):
    dp = mesh[0]
    full, zero = records[(mesh, False)], records[(mesh, True)]
    # Adam: two moments shaped like the parameters (+ the step count).
    assert full["moment_bytes"] == 2 * full["param_bytes"] + 4
    assert zero["moment_bytes"] == 2 * full["param_bytes"] // dp + 4
    # The compiled step's arguments shrink by the moments' share.
    saved = full["argument_bytes"] - zero["argument_bytes"]
    assert saved == full["moment_bytes"] - zero["moment_bytes"], (mesh, saved)


if __name__ == "__main__":
  {"program": main_program, "equality": main_equality, "ties": main_ties, "zero": main_zero}[sys.argv[1]]()
