"""Content fingerprints of what units read from outside the store (cache-key inputs): model
directories, data files, template files. Paths and modification times never enter them: a copy of
the same content has the same fingerprint, an edit in place a new one.

Files up to FULL_BYTES are hashed whole. Larger ones (model weights) by a fast fingerprint: their
size, the safetensors header (every tensor's name, dtype, shape and offsets) and the first and last
MiB. That catches re-trained, re-quantised, truncated or swapped weights in milliseconds per shard;
an edit confined to the middle of a large shard that keeps its size is not seen (hash it yourself
and pin `models[i].revision`, or change the directory, if you edit weights that way).
"""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path

FULL_BYTES = 8 << 20
EDGE_BYTES = 1 << 20

def file_fingerprint(path: Path, full: bool = False) -> str:
    """A file's content hash (sampled above FULL_BYTES unless `full`). Never cached by modification
    time: an edit in place that keeps size and time must still change it."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.blake2b(digest_size=16)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if full or size <= FULL_BYTES:
            for chunk in iter(lambda: f.read(EDGE_BYTES), b""):
                h.update(chunk)
        else:
            if path.suffix == ".safetensors":
                n = struct.unpack("<Q", f.read(8))[0]
                h.update(f.read(min(n, 100 << 20)))  # the header: tensor names, dtypes, shapes, offsets
            f.seek(0)
            h.update(f.read(EDGE_BYTES))
            f.seek(size - EDGE_BYTES)
            h.update(f.read(EDGE_BYTES))
    return h.hexdigest()


def dir_fingerprint(path: Path, full: bool = False) -> str:
    """Every file under a directory (hidden ones and caches left out) by relative name and content."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(root).parts))
    h = hashlib.blake2b(digest_size=16)
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}\0{file_fingerprint(p, full)}\n".encode())
    return h.hexdigest()
