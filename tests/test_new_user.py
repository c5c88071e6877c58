"""What a new user does first: the README's main command twice on one workdir, a stage flag that the
workdir's SAE overrides, --print_config on every main, and the tiny presets' "plumbing" line."""

import json

import pytest

from sae_jax import workdir as workdir_lib
from sae_jax.study.report import findings
from tests.helpers import env


def _summary(stdout: str) -> dict:
  return json.loads(next(x for x in stdout.splitlines() if x.startswith("SUMMARY "))[len("SUMMARY ") :])


def test_the_main_command_twice_on_one_workdir_reports_the_same_run(tmp_path):
  args = ("--config=configs/synthetic.py:tiny", f"--workdir={tmp_path}", "--config.train.tensorboard=False")
  first = env.run_main("train", *args)
  assert first.returncode == 0, first.stderr[-2000:]
  second = env.run_main("train", *args)
  assert second.returncode == 0, second.stderr[-2000:]  # was KeyError: 'fvu'
  a, b = _summary(first.stdout), _summary(second.stdout)
  assert a.pop("nothing_to_train") is False and b.pop("nothing_to_train") is True
  assert a == b  # the finished run's logged metrics (metrics.jsonl) and the same held-out evaluation
  out_a, out_b = first.stdout.splitlines(), second.stdout.splitlines()
  assert (
    "nothing left to train: the newest checkpoint is at step 60 (config.train.num_steps=60)" in second.stdout
  )
  # The summary lines match line for line, bar the time and the "nothing left" line.
  strip = lambda lines: [x.split(" in ")[0] if x.startswith("train: ") else x for x in lines]
  tail_a = strip(out_a[out_a.index(next(x for x in out_a if x.startswith("train: "))) :])
  tail_b = [x for x in strip(out_b[out_b.index(next(x for x in out_b if x.startswith("train: "))) :])]
  assert tail_b == tail_a[:1] + [x for x in tail_b if "nothing left" in x] + tail_a[1:]
  assert "last logged FVU" in tail_b[2] and tail_a[-1].startswith("  tiny preset:")
  # Training did not run again: metrics.jsonl is unchanged (3 logged steps of 20).
  steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps == [20, 40, 60]


def test_a_stage_refuses_an_sae_flag_the_workdir_overrides(trained_sae, tmp_path):
  common = ["--config=configs/synthetic.py:tiny", f"--workdir={tmp_path}"]
  ana = env.run_main(
    "analyze", *common, f"--config.analysis.sae_workdir={trained_sae.workdir}", "--config.sae.d=32"
  )
  assert ana.returncode == 1 and not (tmp_path / "analysis").exists()
  err = ana.stderr.strip()
  assert "\n" not in err
  assert err.startswith(f"error: experiments.analyze uses the SAE of {trained_sae.workdir} (")
  assert "--config.sae.d=32 but the SAE has sae.d=64" in err
  ret = env.run_main(
    "retrieve",
    *common,
    f"--config.retrieval.sae_workdir={trained_sae.workdir}",
    "--config.sae.k=5",
    "--config.sae.c=512",
  )
  assert ret.returncode == 1 and not (tmp_path / "retrieval").exists()
  assert (
    "--config.sae.c=512 but the SAE has sae.c=256; --config.sae.k=5 but the SAE has sae.k=12" in ret.stderr
  )


def test_overrides_in_conflict_names_only_fields_that_differ(trained_sae):
  saved = workdir_lib.read_json(f"{trained_sae.workdir}/config.json")
  same = {"sae.d": 64, "sae.c": 256, "sae.preset": "modern", "data.batch_size": 7}
  assert workdir_lib.overrides_in_conflict(saved, same) == []  # data.* is not the SAE's
  # "auto" fields compare with what they resolved to (sae_spec), not with the word "auto".
  assert saved["sae"]["aux_k"] == -1 and saved["sae_spec"]["aux_k"] == 32
  assert workdir_lib.overrides_in_conflict(saved, {"sae.aux_k": 32}) == []
  assert workdir_lib.overrides_in_conflict(saved, {"sae.aux_k": 16, "sae.preset": "paper"}) == [
    ("sae.aux_k", 16, 32),
    ("sae.preset", "paper", "modern"),
  ]


@pytest.mark.parametrize(
  "module,args,expect",
  [
    ("study", ["--config=configs/study_shapes.py:tiny"], "preset_note: 'tiny preset:"),
    ("export_sae", ["--workdir=w", "--format=saelens", "--out=o"], "format: 'saelens'"),
    ("concepts", ["--config=configs/synthetic.py"], "content_free_rate: 0.9"),
  ],
)
def test_print_config_works_for_every_main(module, args, expect):
  out = env.run_main(module, *args, "--print_config")
  assert out.returncode == 0, out.stderr[-2000:]
  assert expect in out.stdout


def _model(label, kind, r1, ci, chance, fvu=0.1, delta=None, set_size=21):
  base = {"R@1": r1, "R@1_ci95": ci, "chance": {"R@1": chance}, "settings": {}}
  removal = {"R@1": r1 + (delta or [0, [0, 0]])[0], "settings": {"removal_rank": 3}}
  if delta is not None:
    removal["delta_vs_base"] = {"R@1": delta[0], "R@1_ci95": delta[1]}
  whitening = {"R@1": r1 + 1.0, "delta_vs_base": {"R@1": 1.0, "R@1_ci95": [-0.5, 2.5]}, "settings": {}}
  return {
    "label": label,
    "kind": kind,
    "settings": {"base_variant": "mean", "eval_fvu": fvu},
    "retrieval": {"image_to_text": {"mean": base, "mean+removal": removal, "mean+whitening": whitening}},
    "energy": {"top_fraction": 0.01, "top_share": 0.3, "concepts_for_half": 40, "c": 2048},
    "table1": {"set_size": set_size, "J(S_E,S_A)": 0.5, "J(S_E,S_B)": 0.6, "triple_overlap": 0.4},
  }


def test_findings_withhold_what_does_not_exceed_its_noise():
  data = {
    "dataset": "shapes",
    "models": {
      "clip": _model("CLIP", "contrastive", 40.0, [37.0, 43.0], 0.1, delta=[-1.0, [-2.5, 0.4]]),
      # At chance, and its SAE does not reconstruct: no comparison, no Table 1 reading.
      "qwen": _model("Qwen2-VL", "generative", 0.0, [0.0, 0.0], 0.1, fvu=1.19, delta=[5.0, [3.0, 7.0]]),
    },
  }
  text = "\n".join(findings.findings(data))
  assert "retrieves worse" not in text and "lower" not in text
  assert "Retrieval (Qwen2-VL): R@1 0.00 [0.00, 0.00] on shapes q_i -> c_t is at chance (0.10)" in text
  assert "Energy and Table 1 (Qwen2-VL): not interpreted: its SAE's held-out FVU is 1.19" in text
  assert "Overlap (Qwen2-VL)" not in text and "Overlap (CLIP): J(S_E,S_A) 0.50" in text
  assert "Removal (CLIP): removing the top-attribution subspace (rank 3): no detectable change" in text
  assert "Removal (Qwen2-VL): removing the top-attribution subspace (rank 3) helps" in text
  assert (
    "the whitening baseline gives 41.00 (+1.00, paired 95% interval [-0.50, 2.50], no detectable change)"
    in text
  )
  # Two models above chance whose intervals do not overlap: the difference is stated, with both.
  data["models"]["qwen"] = _model("Qwen2-VL", "generative", 5.0, [3.6, 6.5], 0.1, set_size=6)
  text = "\n".join(findings.findings(data))
  assert (
    "the generative Qwen2-VL retrieves worse than the contrastive CLIP on shapes q_i -> c_t: R@1 5.00 "
    "[3.60, 6.50] vs 40.00 [37.00, 43.00] (95% intervals do not overlap, 8.0x lower)" in text
  )
  assert "(sets of 6 concepts: a Jaccard moves in steps of 0.08 or more)" in text
  # Overlapping intervals: no difference is claimed.
  data["models"]["qwen"] = _model("Qwen2-VL", "generative", 38.0, [35.0, 41.0], 0.1)
  text = "\n".join(findings.findings(data))
  assert "no detectable difference between the generative Qwen2-VL and the contrastive CLIP" in text
