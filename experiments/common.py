"""What every main shares: one-line errors instead of tracebacks for bad flags and bad input,
`--print_config`, and the summary lines each main prints when it is done."""

import os
import sys
import time
from typing import Any, Callable, Optional

from absl import flags, logging
from ml_collections import config_flags

from sae_jax import workdir as workdir_lib
from sae_jax.errors import SaeJaxError

_PRINT_CONFIG = flags.DEFINE_bool(
  "print_config",
  False,
  "Print every field of --config (preset and --config.<section>.<field>=value overrides applied) and "
  "exit without running; e.g. --config=configs/synthetic.py --print_config. Every field printed can be "
  "overridden with --config.<section>.<field>=value; the defaults and their meaning are in configs/base.py (the study's: configs/study_common.py).",
)


def parse_flags(argv):
  """absl flag parsing; a bad `--config.<field>` becomes one line naming the field."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError) as e:
    marker = "SaeJaxError: "
    if marker in str(e):  # config_flags wraps a config file's own error in its traceback text
      print(f"error: {str(e).rsplit(marker, 1)[1].strip().splitlines()[0]}", file=sys.stderr)
      sys.exit(2)
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, (AttributeError, KeyError)) or "has no attribute" in message:
      # ml_collections raises a raw AttributeError for `--config.<typo>`: name the flag.
      overrides = [a.split("=")[0][2:] for a in argv[1:] if a.startswith("--config.")]
      missing = message.strip("\"' ")
      bad = [o for o in overrides if o.split(".")[-1] == missing] or overrides
      message = f"unknown config field {', '.join(bad)} (no such key {missing!r} in the config file)"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _main_flag_values() -> str:
  """`name: value` of the running main's own flags (for the mains without a --config)."""
  own = flags.FLAGS.get_key_flags_for_module(sys.argv[0])  # absl files a main's flags under argv[0]
  return "\n".join(
    f"{f.name}: {f.value!r}" for f in sorted(own, key=lambda f: f.name) if f.name != "print_config"
  )


def run_main(
  argv,
  fn,
  config: Optional[Any] = None,
  workdir: Optional[Any] = None,
  report: Optional[Callable[[Any, float], list]] = None,
):
  """Runs `fn()`; with `report`, prints `report(result, seconds)` (lines) when it returns.

  `config`: the main's config flag, printed instead of running under --print_config; `workdir`: its
  --workdir flag, required unless --print_config.
  """
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it renames at INFO
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  try:
    if _PRINT_CONFIG.value:
      print(config.value if config is not None else _main_flag_values())
      return None
    if workdir is not None and not workdir.value:
      print("error: --workdir is required (the run directory)", file=sys.stderr)
      sys.exit(2)
    t0 = time.perf_counter()
    result = fn()
    if report is not None:
      print("\n".join(report(result, time.perf_counter() - t0)), flush=True)
    return result
  except SaeJaxError as e:
    print(f"error: {e}", file=sys.stderr)
    # 75 where a re-run resumes (a storage error that persisted: `exit_code`), else 1.
    sys.exit(int(getattr(e, "exit_code", 1)))
  except OSError as e:
    if "config file" not in str(e):
      raise
    # config_flags defers a bad --config path until first use; keep its last (errno) line.
    reason = str(e).strip().splitlines()[-1].strip()
    print(f"error: --config could not be loaded: {reason}", file=sys.stderr)
    sys.exit(2)


def refuse_overrides_of_the_workdir(config_flag: Any, sae_workdir: str, what: str) -> None:
  """Stops (one line per field) when --config.sae.* differs from the SAE the stage loads from
  `sae_workdir`: the stage uses the workdir's SAE, so such a flag would otherwise vanish silently.
  Fields the user did not set say nothing."""
  overrides = config_flags.get_override_values(flags.FLAGS[config_flag.name])
  path = os.path.join(sae_workdir, workdir_lib.CONFIG_FILE)
  if not overrides or not os.path.exists(path):
    return  # no SAE there yet: the stage says so itself
  clashes = workdir_lib.overrides_in_conflict(workdir_lib.read_json(path), overrides)
  if clashes:
    fields = "; ".join(f"--config.{f}={v!r} but the SAE has {f}={o!r}" for f, v, o in clashes)
    raise SaeJaxError(
      f"{what} uses the SAE of {sae_workdir} ({path}): {fields}; drop the flag(s), or train an SAE with "
      "these values into another --workdir"
    )


def note_lines(config: Any) -> list:
  """The preset's note (the tiny presets: they test the plumbing, not the quality)."""
  return [f"  {config.preset_note}"] if config.preset_note else []


def train_report(config_flag: Any) -> Callable[[dict, float], list]:
  """Summary lines of experiments.train: the workdir, the final step's FVU / L0 / dead share, time."""

  def report(summary: dict, seconds: float) -> list:
    config = config_flag.value
    wd = summary["workdir"]
    logged = (
      f"last logged FVU {summary['fvu']:.4f}, L0 {summary['l0']:.1f}, dead {100 * summary['dead_fraction']:.1f}%"
      if "fvu" in summary
      else "no training metrics in metrics.jsonl"
    )
    lines = [
      f"train: {wd} at step {summary['step']} in {seconds:.1f} s "
      f"(checkpoints/, metrics.jsonl, config.json{', tensorboard/' if config.train.tensorboard else ''})",
      f"  held-out FVU {summary['eval_fvu']:.4f} over {summary['eval_rows']} rows (1 = no better than the "
      f"mean); {logged}",
    ]
    if summary.get("nothing_to_train"):
      lines.insert(
        1,
        f"  nothing left to train: the newest checkpoint is at step {summary['step']} "
        f"(config.train.num_steps={config.train.num_steps}); the figures are the finished run's",
      )
    if "planted_mean_max_cos" in summary:
      lines.append(
        f"  planted atoms recovered: mean max cosine {summary['planted_mean_max_cos']:.3f} (1 = all)"
      )
    return lines + note_lines(config)

  return report


def study_report(config_flag: Any) -> Callable[[dict, float], list]:
  """Summary lines of experiments.study: the report's files, the models, the time."""

  def report(result: dict, seconds: float) -> list:
    out = result["report"]
    lines = [
      f"study: {out['md']} (+ report.html, report.json, {len(out['figures'])} figures) in {seconds:.1f} s",
      f"  models: {', '.join(result['steps'])}; findings are in the report (an effect is stated only "
      "where its interval excludes zero)",
    ]
    return lines + note_lines(config_flag.value)

  return report


def extract_report(config_flag: Any, workdir_flag: Any) -> Callable[[dict, float], list]:
  """Summary lines of experiments.extract: files written, counts, time."""

  def report(summary: dict, seconds: float) -> list:
    config = config_flag.value
    act = os.path.join(workdir_flag.value, "activations")
    files = sorted(f for f in os.listdir(act) if f.endswith((".npz", ".json")))
    counts = ", ".join(f"{v} {k}" for k, v in summary["counts"].items() if not k.startswith("shard"))
    lines = [f"extract: {summary['model']} -> {act}/ ({', '.join(files)}) in {seconds:.1f} s", f"  {counts}"]
    if "process_count" in summary and not summary.get("merged"):  # one part of a multi-process run
      p, n = summary["process_index"], summary["process_count"]
      lines[0] = f"extract: part {p} of {n} of {summary['model']} -> {act}/ in {seconds:.1f} s"
      lines.append(f"  {act}/ is merged by the last of the {n} processes to finish")
    if summary.get("shard_dir"):  # the M-BEIR extraction writes no training shards
      c = summary["counts"]
      lines.append(
        f"  training shards: {summary['shard_dir']} ({c['shards']} shards, {c['shard_rows']} rows)"
      )
    if "eval" in summary:  # the evaluation split, extracted by the same run (pooled only)
      e = summary["eval"]["counts"]
      lines.append(
        f"  evaluation split -> {act}/eval/: {e['images']} images, {e['captions']} captions, {e['pairs']} pairs"
      )
    return lines + note_lines(config)

  return report
