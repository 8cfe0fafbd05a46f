"""A small TensorBoard event-file writer for scalars (no TensorFlow, no protobuf library).

  writer = ScalarWriter("<workdir>/tensorboard/seed_0")
  writer.scalars(step, {"train/loss": 0.69, "eval/t12/exact_accuracy": 0.11})
  writer.close()

Event files are TFRecord files of `tensorflow.Event` protos. This writes the three messages it
needs by hand (the protobuf wire format is stable):
  Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
  Summary { repeated Value value = 1; }
  Value   { string tag = 1; float simple_value = 2; }
and frames each record as: uint64 length, uint32 masked CRC-32C of the length, the bytes,
uint32 masked CRC-32C of the bytes (little endian). Tests read the files back with TensorBoard's
own loader. Non-finite values are written as they are (TensorBoard shows NaN).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Mapping
from pathlib import Path


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1   # negative int64 as two's complement, as protobuf does
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  return _varint(number << 3 | wire_type) + payload


def _length_delimited(number: int, data: bytes) -> bytes:
  return _field(number, 2, _varint(len(data)) + data)


def event_bytes(wall_time: float, step: int, *, file_version: str | None = None,
                scalars: Mapping[str, float] | None = None) -> bytes:
  """The serialized Event proto (see the module docstring)."""
  out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  if scalars:
    values = b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode())
                          + _field(2, 5, struct.pack("<f", float(value))))
        for tag, value in scalars.items())
    out += _length_delimited(5, values)
  return out


def record_bytes(data: bytes) -> bytes:
  """One TFRecord frame around `data`."""
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", _masked_crc(header)) + data
          + struct.pack("<I", _masked_crc(data)))


class ScalarWriter:
  """Appends scalar summaries to a new event file in `log_dir` (one file per writer)."""

  def __init__(self, log_dir: str | Path):
    self.log_dir = Path(log_dir)
    self.log_dir.mkdir(parents=True, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.sleep_lm"
    self.path = self.log_dir / name
    self._file = self.path.open("ab")
    self._write(event_bytes(time.time(), 0, file_version="brain.Event:2"))

  def _write(self, event: bytes) -> None:
    self._file.write(record_bytes(event))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    self._write(event_bytes(time.time(), int(step), scalars=values))
    self._file.flush()

  def close(self) -> None:
    self._file.close()
