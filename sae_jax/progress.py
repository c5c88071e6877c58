"""The progress line of a long stage (extraction, analysis blocks, retrieval settings)."""

from __future__ import annotations

import math
import sys
import time


class Progress:
  """done/total, rate and ETA of a long loop: a tqdm bar when stderr is a terminal, else a plain
  stderr line every `every_s` seconds and at the end (a cluster's log file; not absl's log, which the
  mains set to WARNING to keep orbax quiet). `what` starts the line; `unit` names what is counted."""

  def __init__(self, total: int, what: str, every_s: float, done: int = 0, unit: str = "items"):
    self.total, self.what, self.every_s, self.unit = total, what, every_s, unit
    self.done = done
    self.start_done = done
    self.t0 = self.last = time.perf_counter()
    self.bar = None
    if sys.stderr.isatty():
      try:
        import tqdm  # the `extract` extra; a core install prints lines instead
      except ImportError:
        return
      self.bar = tqdm.tqdm(total=total, initial=done, desc=what, unit=unit.rstrip("s"))

  @property
  def rate(self) -> float:
    dt = time.perf_counter() - self.t0
    return (self.done - self.start_done) / dt if dt > 0 else 0.0

  def update(self, n: int) -> None:
    self.done += n
    if self.bar is not None:
      self.bar.update(n)
    now = time.perf_counter()
    if self.bar is None and (now - self.last >= self.every_s or self.done >= self.total):
      self.last = now
      rate = self.rate
      eta = (self.total - self.done) / rate if rate > 0 else float("nan")
      print(
        f"{self.what}: {self.done}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s, ETA {_fmt_s(eta)}",
        file=sys.stderr,
        flush=True,
      )

  def close(self):
    if self.bar is not None:
      self.bar.close()


def _fmt_s(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
