"""Readers of the training logs the tests check: TensorBoard event files and W&B offline run files."""

import struct


def tensorboard_events(data: bytes) -> list:
  """(step, tag, value) of a TensorBoard event file (TFRecord framing: length, crc, event, crc); a
  SessionLog.START event (tensorboardX's `purge_step`) is (step, "START", None)."""
  from tensorboardX.proto import event_pb2

  out, pos = [], 0
  while pos < len(data):
    (n,) = struct.unpack("<Q", data[pos : pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
    if event.WhichOneof("what") == "session_log" and event.session_log.status == event.session_log.START:
      out.append((event.step, "START", None))
    out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    pos += 12 + n + 4
  return out


def tensorboard_history(files: list) -> dict:
  """{tag: {step: value}} as TensorBoard shows event files read in order: a SessionLog.START at
  step s hides the events already read at steps >= s (TensorBoard's purge of a restarted run)."""
  shown: list = []
  for data in files:
    for step, tag, value in tensorboard_events(data):
      if tag == "START":
        shown = [e for e in shown if e[0] < step]
      else:
        shown.append((step, tag, value))
  history: dict = {}
  for step, tag, value in shown:
    assert step not in history.setdefault(tag, {}), f"{tag} at step {step} shown twice"
    history[tag][step] = value
  return history


def read_wandb_records(path: str) -> list:
  """Records of a `.wandb` file: a 7-byte header (':W&B', magic, version) and then LevelDB-log
  records in 32 KiB blocks (crc32 4 bytes, length 2, type 1: full / first / middle / last)."""
  from wandb.proto import wandb_internal_pb2

  data = open(path, "rb").read()
  assert data[:4] == b":W&B", path
  pos, records, pending = 7, [], b""
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:  # the block tail is too short for a header: padding
      pos += 32768 - pos % 32768
      continue
    _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
    chunk = data[pos + 7 : pos + 7 + length]
    pos += 7 + length
    if kind == 0 and length == 0:
      continue
    pending += chunk
    if kind in (1, 4):  # full, last
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      records.append(record)
      pending = b""
  return records
