"""What a checkpoint file is, before reading it: its kind from the first bytes, and the error
every checkpoint reader raises. (Below `checkpoints` and `hub`, which both need them.)"""

from __future__ import annotations

import pathlib


class CheckpointError(ValueError):
  """A checkpoint cannot be read, is of an unsupported kind, or does not fit the architecture."""


def sniff(path: pathlib.Path) -> str:
  """Returns 'msgpack', 'pickle', 'safetensors', 'empty' or 'unknown' from the first bytes."""
  with open(path, 'rb') as f:
    head = f.read(9)
  if not head:
    return 'empty'
  if head.startswith(b'PK\x03\x04'):  # torch>=1.6 zip archive
    return 'pickle'
  if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:  # pickle PROTO opcode
    return 'pickle'
  if len(head) == 9 and head[8:9] == b'{':  # u64 header length + JSON header
    header_len = int.from_bytes(head[:8], 'little')
    if 0 < header_len < 100_000_000:
      return 'safetensors'
  if 0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF):  # fixmap / map16 / map32
    return 'msgpack'
  return 'unknown'
