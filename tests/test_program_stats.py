"""HLO program stats: collectives in loops, bytes per step, scatters, trip-counted FLOPs."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from sae_jax.training.program_stats import Collective, ProgramStats, flops_with_trip_counts, parse_hlo

# A while loop (known_trip_count 7) whose body all-reduces f32[128,64] and runs a fusion holding a
# scatter; the entry all-gathers bf16[4,16]. Operands bare, as current XLA prints them.
HLO_LOOP = """\
HloModule jit_step, is_scheduled=true, num_partitions=8

FileNames
1 "/tmp/step.py"

StackFrames
1 {file_location_id=1 parent_frame_id=1}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%fused_scatter (p0: f32[128,64], p1: s32[32,1], p2: f32[32,64]) -> f32[128,64] {
  %p0 = f32[128,64]{1,0} parameter(0)
  %p1 = s32[32,1]{1,0} parameter(1)
  %p2 = f32[32,64]{1,0} parameter(2)
  ROOT %scatter.3 = f32[128,64]{1,0} scatter(%p0, %p1, %p2), update_window_dims={1}, \
inserted_window_dims={0}, scatter_dims_to_operand_dims={0}, index_vector_dim=1, to_apply=%add
}

%body (t: (s32[], f32[128,64], s32[32,1], f32[32,64])) -> (s32[], f32[128,64], s32[32,1], f32[32,64]) {
  %t = (s32[], f32[128,64]{1,0}, s32[32,1]{1,0}, f32[32,64]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %acc = f32[128,64]{1,0} get-tuple-element(%t), index=1
  %idx = s32[32,1]{1,0} get-tuple-element(%t), index=2
  %rows = f32[32,64]{1,0} get-tuple-element(%t), index=3
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %scatter_fusion = f32[128,64]{1,0} fusion(%acc, %idx, %rows), kind=kLoop, calls=%fused_scatter
  %all-reduce.5 = f32[128,64]{1,0} all-reduce(%scatter_fusion), channel_id=1, \
replica_groups=[1,8]<=[8], use_global_device_ids=true, to_apply=%add
  ROOT %out = (s32[], f32[128,64]{1,0}, s32[32,1]{1,0}, f32[32,64]{1,0}) tuple(%next, \
%all-reduce.5, %idx, %rows)
}

%cond (c: (s32[], f32[128,64], s32[32,1], f32[32,64])) -> pred[] {
  %c = (s32[], f32[128,64]{1,0}, s32[32,1]{1,0}, f32[32,64]{1,0}) parameter(0)
  %ci = s32[] get-tuple-element(%c), index=0
  %limit = s32[] constant(7)
  ROOT %lt = pred[] compare(%ci, %limit), direction=LT
}

ENTRY %main (acc0: f32[128,64], idx0: s32[32,1], rows0: f32[32,64], g: bf16[1,16]) \
-> (f32[128,64], bf16[4,16]) {
  %acc0 = f32[128,64]{1,0} parameter(0)
  %idx0 = s32[32,1]{1,0} parameter(1)
  %rows0 = f32[32,64]{1,0} parameter(2)
  %g = bf16[1,16]{1,0} parameter(3)
  %zero = s32[] constant(0)
  %init = (s32[], f32[128,64]{1,0}, s32[32,1]{1,0}, f32[32,64]{1,0}) tuple(%zero, %acc0, %idx0, %rows0)
  %while.3 = (s32[], f32[128,64]{1,0}, s32[32,1]{1,0}, f32[32,64]{1,0}) while(%init), condition=%cond, \
body=%body, backend_config={"known_trip_count":{"n":"7"},"known_init_step":{"init":"0","step":"1"}}
  %final = f32[128,64]{1,0} get-tuple-element(%while.3), index=1
  %all-gather.1 = bf16[4,16]{1,0} all-gather(%g), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}
  ROOT %res = (f32[128,64]{1,0}, bf16[4,16]{1,0}) tuple(%final, %all-gather.1)
}
"""


def test_parse_hlo_hand_written_loop():
  stats = parse_hlo(HLO_LOOP)
  assert isinstance(stats, ProgramStats)
  assert stats.count("all-reduce") == 1 and stats.count("all-gather") == 1 and len(stats.collectives) == 2
  ar = next(c for c in stats.collectives if c.op == "all-reduce")
  ag = next(c for c in stats.collectives if c.op == "all-gather")
  assert ar == Collective("all-reduce", "body", 128 * 64 * 4, True, 7, True, "all-reduce.5")
  assert (ag.computation, ag.bytes, ag.in_loop, ag.trip_count) == ("main", 4 * 16 * 2, False, 1)
  assert stats.collectives_in_loops() == [ar]
  assert stats.collective_bytes_per_step() == 7 * 128 * 64 * 4 + 4 * 16 * 2
  assert stats.scatters == [("fused_scatter", (128, 64), True)]
  assert stats.while_loops == [("body", 7)]
  summary = stats.to_json()
  json.dumps(summary)
  assert summary["collectives"] == 2 and summary["collectives_in_loops"] == 1
  assert summary["collective_bytes_per_step"] == 7 * 128 * 64 * 4 + 4 * 16 * 2
  assert summary["collectives_by_op"]["all-reduce"] == dict(
    count=1, in_loops=1, bytes=32768, bytes_per_step=7 * 32768
  )
  assert summary["scatters_in_loops"] == 1 and summary["trip_counts"] == [7]
  assert summary["trip_counts_known"]


# Async pairs (one with an -update in between), a tuple all-reduce, operands printed with their
# types (older XLA), a nested loop without known_trip_count, a conditional, a dot in each loop.
HLO_ASYNC = """\
HloModule m

add {
  x = f32[] parameter(0)
  y = f32[] parameter(1)
  ROOT s = f32[] add(x, y)
}

inner_body {
  p = (s32[], f32[8,16]) parameter(0)
  v = f32[8,16]{1,0} get-tuple-element(p), index=1
  w = f32[16,16]{1,0} constant({...})
  d = f32[8,16]{1,0} dot(f32[8,16]{1,0} v, f32[16,16]{1,0} w), \
lhs_contracting_dims={1}, rhs_contracting_dims={0}
  cp = (f32[8,16], f32[8,16], u32[], u32[]) collective-permute-start(d), source_target_pairs={{0,1},{1,0}}
  cpd = f32[8,16]{1,0} collective-permute-done(cp)
  i = s32[] get-tuple-element(p), index=0
  ROOT t = (s32[], f32[8,16]) tuple(i, cpd)
}

inner_cond {
  p = (s32[], f32[8,16]) parameter(0)
  ROOT b = pred[] constant(true)
}

outer_body {
  p = (s32[], f32[8,16]) parameter(0)
  v = f32[8,16]{1,0} get-tuple-element(p), index=1
  ars = f32[8,16]{1,0} all-reduce-start(v), replica_groups={{0,1}}, to_apply=add
  ard = f32[8,16]{1,0} all-reduce-done(ars)
  rss = ((f32[8,16]), f32[4,16]) reduce-scatter-start(ard), dimensions={0}, to_apply=add
  rsu = ((f32[8,16]), f32[4,16]) reduce-scatter-update(rss)
  rsd = f32[4,16]{1,0} reduce-scatter-done(rsu)
  ags = (f32[4,16], f32[8,16]) all-gather-start(rsd), dimensions={0}
  agd = f32[8,16]{1,0} all-gather-done(ags)
  w2 = f32[16,32]{1,0} constant({...})
  d2 = f32[8,32]{1,0} dot(agd, w2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  i = s32[] get-tuple-element(p), index=0
  t0 = (s32[], f32[8,16]) tuple(i, agd)
  inner = (s32[], f32[8,16]) while(t0), condition=inner_cond, body=inner_body
  ROOT r = (s32[], f32[8,16]) tuple(i, agd)
}

outer_cond {
  p = (s32[], f32[8,16]) parameter(0)
  ROOT b = pred[] constant(true)
}

branch_a {
  p = f32[8,16] parameter(0)
  ROOT a2a = f32[8,16]{1,0} all-to-all(f32[8,16]{1,0} p), dimensions={0}
}

branch_b {
  ROOT p = f32[8,16] parameter(0)
}

ENTRY main {
  x = f32[8,16]{1,0} parameter(0)
  k = pred[] parameter(1)
  z = s32[] constant(0)
  t = (s32[], f32[8,16]) tuple(z, x)
  loop = (s32[], f32[8,16]) while(t), condition=outer_cond, body=outer_body, \
backend_config={"known_trip_count":{"n":"5"}}
  both = (f32[], s32[2]{0}) all-reduce(f32[] x, s32[2]{0} z), to_apply=add
  ROOT c = f32[8,16]{1,0} conditional(k, x, x), branch_computations={branch_a, branch_b}
}
"""


def test_parse_hlo_async_pairs_nested_and_unknown_loops():
  stats = parse_hlo(HLO_ASYNC)
  by_op = {c.op: c for c in stats.collectives}
  assert sorted(by_op) == ["all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter"]
  assert stats.count("all-reduce") == 2 and stats.count("all-reduce-start") == 2
  in_loop = [c for c in stats.collectives if c.op == "all-reduce" and c.in_loop]
  assert len(in_loop) == 1 and in_loop[0].bytes == 8 * 16 * 4 and in_loop[0].trip_count == 5
  assert by_op["reduce-scatter"].bytes == 4 * 16 * 4  # the done's result, not the start's tuple
  assert by_op["all-gather"].bytes == 8 * 16 * 4
  cp = by_op["collective-permute"]
  assert (cp.computation, cp.in_loop, cp.trip_count, cp.trip_count_known) == ("inner_body", True, 5, False)
  assert by_op["reduce-scatter"].trip_count_known
  entry_ar = next(c for c in stats.collectives if c.op == "all-reduce" and not c.in_loop)
  assert entry_ar.bytes == 4 + 2 * 4  # tuple result, summed
  assert (by_op["all-to-all"].computation, by_op["all-to-all"].in_loop) == ("branch_a", False)
  assert sorted(stats.while_loops) == [("inner_body", -1), ("outer_body", 5)]
  assert not stats.to_json()["trip_counts_known"]
  # dots: outer body 5x (2*8*32*16), inner body 5x1 (unknown trip count) (2*8*16*16)
  assert flops_with_trip_counts(HLO_ASYNC) == 5 * 2 * 8 * 32 * 16 + 5 * 2 * 8 * 16 * 16


def test_flops_gemm_custom_call_and_convolution():
  hlo = textwrap.dedent("""\
    HloModule g
    ENTRY %e (a: f16[4,64,32], b: f16[4,32,16], x: f32[2,10,10,3], k: f32[3,3,3,8]) -> f32[2,8,8,8] {
      %a = f16[4,64,32]{2,1,0} parameter(0)
      %b = f16[4,32,16]{2,1,0} parameter(1)
      %g = (f16[4,64,16]{2,1,0}, s8[1024]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", \
backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["2"],\
"rhs_contracting_dimensions":["1"],"lhs_batch_dimensions":["0"],"rhs_batch_dimensions":["0"]}}}
      %x = f32[2,10,10,3]{3,2,1,0} parameter(2)
      %k = f32[3,3,3,8]{3,2,1,0} parameter(3)
      ROOT %conv = f32[2,8,8,8]{3,2,1,0} convolution(%x, %k), window={size=3x3}, dim_labels=b01f_01io->b01f
    }
    """)
  assert flops_with_trip_counts(hlo) == 2 * 4 * 64 * 16 * 32 + 2 * (2 * 8 * 8 * 8) * (3 * 3 * 3)


_DEVICE_CODE = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from sae_jax.training.program_stats import flops_with_trip_counts, program_stats

mesh = Mesh(np.array(jax.devices()), ("data",))
c, d, b, steps = 64, 16, 256, 12
acc, rows, idx = jnp.zeros((c, d)), jnp.ones((b, d)), jnp.arange(b, dtype=jnp.int32) % c

def loop(acc, rows, idx):
  return jax.lax.fori_loop(0, steps, lambda i, a: a.at[idx].add(rows * i), acc)

gspmd = jax.jit(loop, in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data", None)),
                                    NamedSharding(mesh, P("data"))),
                out_shardings=NamedSharding(mesh, P())).lower(acc, rows, idx).compile()

def local_then_psum(acc, rows, idx):
  acc = jax.lax.pcast(acc, "data", to="varying")
  return jax.lax.psum(loop(acc, rows, idx), "data")

smap = jax.jit(jax.shard_map(local_then_psum, mesh=mesh, in_specs=(P(), P("data", None), P("data")),
                             out_specs=P())).lower(acc, rows, idx).compile()

x, w = jnp.ones((32, 64)), jnp.ones((64, 64))
mm = jax.jit(lambda x, w: jax.lax.fori_loop(0, 10, lambda i, x: jnp.tanh(x @ w), x)).lower(x, w).compile()
out = dict(devices=jax.device_count(), steps=steps, acc_bytes=c * d * 4,
           gspmd=program_stats(gspmd).to_json(), smap=program_stats(smap).to_json(),
           gspmd_loops=[[c.op, c.in_loop, c.trip_count] for c in program_stats(gspmd).collectives],
           mm_flops=flops_with_trip_counts(mm), mm_cost_flops=mm.cost_analysis()["flops"])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def device_stats():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
  }
  proc = subprocess.run(
    [sys.executable, "-c", _DEVICE_CODE], env=env, capture_output=True, text=True, timeout=120, cwd=root
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_gspmd_scatter_loop_all_reduces_inside_the_loop(device_stats):
  assert device_stats["devices"] == 8
  s = device_stats["gspmd"]
  assert s["collectives_in_loops"] >= 1
  assert any(
    op == "all-reduce" and in_loop and trips == device_stats["steps"]
    for op, in_loop, trips in device_stats["gspmd_loops"]
  )
  assert s["scatters_in_loops"] >= 1 and s["trip_counts"] == [device_stats["steps"]]
  assert s["collective_bytes_per_step"] >= device_stats["steps"] * device_stats["acc_bytes"]


def test_shard_map_psum_after_the_loop(device_stats):
  s = device_stats["smap"]
  assert s["collectives"] == 1 and s["collectives_in_loops"] == 0
  assert s["collectives_by_op"]["all-reduce"]["count"] == 1
  assert s["collective_bytes"] == s["collective_bytes_per_step"] == device_stats["acc_bytes"]
  assert s["scatters_in_loops"] >= 1


def test_flops_count_the_loop_body_trip_count_times(device_stats):
  one_body = 2 * 32 * 64 * 64
  assert device_stats["mm_flops"] == 10 * one_body
  assert device_stats["mm_cost_flops"] < 2 * one_body  # cost_analysis counts the body once
