"""What every main shares: one-line errors instead of tracebacks for bad flags and bad input."""

import sys

from absl import flags, logging

from sae_jax.errors import SaeJaxError


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


def run_main(argv, fn):
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it renames at INFO
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  try:
    return fn()
  except SaeJaxError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except OSError as e:
    if "config file" not in str(e):
      raise
    # config_flags defers a bad --config path until first use; keep its last (errno) line.
    reason = str(e).strip().splitlines()[-1].strip()
    print(f"error: --config could not be loaded: {reason}", file=sys.stderr)
    sys.exit(2)
