"""Metric writers: JSON lines and TensorBoard event files, with no TensorFlow dependency.

The TensorBoard format is written directly: a file `events.out.tfevents.<time>.<host>` of records

  uint64 length | uint32 masked_crc32c(length) | bytes event | uint32 masked_crc32c(event)

(little endian; tensorflow/core/lib/io/record_writer.cc), each `event` a serialized
`tensorflow.Event` protobuf (tensorflow/core/util/event.proto): wall_time (1, double), step
(2, int64), file_version (3, string, the first event: "brain.Event:2") or summary (5, message
Summary { repeated Value value = 1 }, Value { string tag = 1; float simple_value = 2 }).
The protobuf fields are encoded by hand below; TensorBoard reads these files as it reads
tf.summary / tensorboardX output.
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from typing import Any, Dict, Mapping, Optional

import numpy as np

# ------------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), table driven; the records are small so pure Python is fast enough.
# ------------------------------------------------------------------------------------------------


def _crc_table():
  poly = 0x82F63B78  # reflected 0x1EDC6F41
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ poly if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  table = _CRC_TABLE
  for b in data:
    crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC: rotate right by 15 and add a constant."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ------------------------------------------------------------------------------------------------
# Minimal protobuf encoding
# ------------------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
  out = bytearray()
  value &= (1 << 64) - 1  # negative int64 as two's complement, 10 bytes
  while True:
    b = value & 0x7F
    value >>= 7
    if value:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _key(field: int, wire: int) -> bytes:
  return _varint((field << 3) | wire)


def _bytes_field(field: int, data: bytes) -> bytes:
  return _key(field, 2) + _varint(len(data)) + data


def encode_event(wall_time: float, step: int, *, file_version: Optional[str] = None,
                 scalars: Optional[Mapping[str, float]] = None) -> bytes:
  """A serialized tensorflow.Event with either a file_version or scalar summary values."""
  out = _key(1, 1) + struct.pack("<d", float(wall_time)) + _key(2, 0) + _varint(int(step))
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if scalars:
    summary = b""
    for tag, value in scalars.items():
      v = _bytes_field(1, str(tag).encode()) + _key(2, 5) + struct.pack("<f", float(value))
      summary += _bytes_field(1, v)
    out += _bytes_field(5, summary)
  return out


def encode_record(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data
          + struct.pack("<I", masked_crc32c(data)))


def read_records(path: str):
  """Yields the payload of each record of a TFRecord / event file, checking both CRCs."""
  with open(path, "rb") as f:
    while True:
      header = f.read(8)
      if not header:
        return
      if len(header) < 8:
        raise ValueError(f"{path}: truncated record header")
      (length,) = struct.unpack("<Q", header)
      (crc,) = struct.unpack("<I", f.read(4))
      if crc != masked_crc32c(header):
        raise ValueError(f"{path}: bad length crc")
      data = f.read(length)
      (crc,) = struct.unpack("<I", f.read(4))
      if crc != masked_crc32c(data):
        raise ValueError(f"{path}: bad data crc")
      yield data


def decode_scalars(event: bytes) -> tuple[int, Dict[str, float]]:
  """(step, {tag: value}) of an event written by `encode_event` (for tests and tools)."""

  def varint(buf, i):
    shift = value = 0
    while True:
      b = buf[i]
      i += 1
      value |= (b & 0x7F) << shift
      shift += 7
      if not b & 0x80:
        return value, i

  def fields(buf):
    i = 0
    while i < len(buf):
      key, i = varint(buf, i)
      field, wire = key >> 3, key & 7
      if wire == 0:
        value, i = varint(buf, i)
      elif wire == 1:
        value, i = buf[i:i + 8], i + 8
      elif wire == 5:
        value, i = buf[i:i + 4], i + 4
      elif wire == 2:
        n, i = varint(buf, i)
        value, i = buf[i:i + n], i + n
      else:
        raise ValueError(f"unsupported wire type {wire}")
      yield field, value

  step, scalars = 0, {}
  for field, value in fields(event):
    if field == 2:
      step = value
    elif field == 5:
      for f, v in fields(value):
        if f == 1:
          tag, simple = None, None
          for ff, vv in fields(v):
            if ff == 1:
              tag = vv.decode()
            elif ff == 2:
              (simple,) = struct.unpack("<f", vv)
          scalars[tag] = simple
  return step, scalars


# ------------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------------


def _scalar(value: Any) -> Optional[float]:
  try:
    v = float(np.asarray(value))
  except (TypeError, ValueError):
    return None
  return v


class TensorBoardWriter:
  """Scalars to `<logdir>/events.out.tfevents.*`; flushed after every write."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._f = open(self.path, "ab")
    self._f.write(encode_record(encode_event(time.time(), 0, file_version="brain.Event:2")))
    self._f.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = {k: v for k, v in ((k, _scalar(v)) for k, v in scalars.items()) if v is not None}
    if values:
      self._f.write(encode_record(encode_event(time.time(), step, scalars=values)))
      self._f.flush()

  def close(self) -> None:
    if not self._f.closed:
      self._f.close()


class JsonlWriter:
  """One JSON object per line: {"step": s, "time": t, <name>: value, ...}."""

  def __init__(self, path: str, *, truncate_after_step: Optional[int] = None):
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if truncate_after_step is not None and os.path.exists(path):
      # A resumed run repeats the steps after its checkpoint: drop their old lines.
      keep = []
      with open(path) as f:
        for line in f:
          try:
            if int(json.loads(line).get("step", -1)) <= truncate_after_step:
              keep.append(line if line.endswith("\n") else line + "\n")
          except (ValueError, json.JSONDecodeError):
            pass  # a torn last line from a killed run
      with open(path, "w") as f:
        f.writelines(keep)
    self._f = open(path, "a")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {"step": int(step), "time": round(time.time(), 3)}
    for k, v in scalars.items():
      v = _scalar(v)
      if v is not None:
        record[k] = v if math.isfinite(v) else str(v)
    self._f.write(json.dumps(record) + "\n")
    self._f.flush()

  def close(self) -> None:
    if not self._f.closed:
      self._f.close()


class MultiWriter:
  def __init__(self, *writers):
    self.writers = [w for w in writers if w is not None]

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for w in self.writers:
      w.write_scalars(step, scalars)

  def close(self) -> None:
    for w in self.writers:
      w.close()


class NullWriter:
  def write_scalars(self, step, scalars) -> None:
    pass

  def close(self) -> None:
    pass
