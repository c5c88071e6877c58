"""Small helpers shared by the config files and the stages that read them."""

from __future__ import annotations

from typing import Any, Iterable

from sae_jax.errors import SaeJaxError


def as_tuple(value: Any) -> tuple:
  """A config tuple field as a tuple; a comma-separated string (from a command line) is split."""
  if value is None:
    return ()
  if isinstance(value, str):
    return tuple(v.strip() for v in value.split(",") if v.strip())
  return tuple(value)


def parse_arg(arg: str, accepted: Iterable[str], config_file: str) -> frozenset:
  """The words of a preset argument (`--config=configs/x.py:tiny,paper`), checked strictly.

  An unknown word is an error naming it and the accepted ones (a typo must not silently run
  the full preset).
  """
  accepted = tuple(accepted)
  words = frozenset(w.strip() for w in (arg or "").split(",") if w.strip())
  unknown = sorted(words - set(accepted))
  if unknown:
    raise SaeJaxError(
      f"--config={config_file}:{arg}: unknown argument word {unknown[0]!r}; "
      f"accepted words: {', '.join(accepted)}"
    )
  return words
