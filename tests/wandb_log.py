"""Read an offline W&B run file (``run-<id>.wandb``) without a network or the W&B service.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB
blocks of records, each ``crc32 (4) | length (2, LE) | type (1: full, 2: first, 3: middle,
4: last)`` followed by a protobuf ``Record``.
"""

from __future__ import annotations

from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768


def records(path: Path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending, chunks = 7, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
        else:
            break
    return [wandb_internal_pb2.Record.FromString(c) for c in chunks]


def history_keys(path: Path) -> set[str]:
    """Every key logged with ``log`` (history rows) in the run."""
    return {item.key or "/".join(item.nested_key)
            for r in records(path) if r.WhichOneof("record_type") == "history"
            for item in r.history.item}
