"""What every main shares: one-line errors instead of tracebacks for bad flags and bad input."""

import sys

from absl import flags

from sae_jax.errors import SaeJaxError


def parse_flags(argv):
  """absl flag parsing; a bad `--config.<field>` becomes one line naming the field."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e).strip().splitlines()[0]
    if "has no attribute" in message or "AttributeError" in message or "does not exist" in message:
      bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
      message = f"unknown config field in {' '.join(bad) or 'flags'}: {message}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run_main(argv, fn):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  try:
    return fn()
  except SaeJaxError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
