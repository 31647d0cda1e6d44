"""Atomic file writes: write to a temp file in the same directory, then rename.

An interrupted run never leaves a half-written file under the final name, so resuming can trust
that every file it finds is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            # mkstemp makes the file private (0600); the result should get the usual permissions, so a RUN_DIR on
            # shared storage is readable by the other nodes' processes and users, as any file written directly
            os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; on success it replaces `path` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide models and indexes from other users
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _json_default(o: Any) -> Any:
    # numpy scalars and paths show up in metrics and configs
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json_if_valid(path: str | os.PathLike) -> Any | None:
    """The JSON in `path`, or None when it is missing, empty or cut short (a marker written by a killed process
    or truncated on disk means "not complete", never a traceback)."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


SMALL = 64 << 20  # files up to this size are hashed whole; larger ones (corpora, indexes) by their ends
SAMPLE = 4 << 20


def file_digest(path: str | os.PathLike, size: int) -> str:
    """A content hash of a file of `size` bytes: of all of it when small, of its first and last MiBs when large."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        if size <= SMALL:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        else:
            h.update(f.read(SAMPLE))
            f.seek(size - SAMPLE)
            h.update(f.read(SAMPLE))
    return h.hexdigest()[:16]


def describe_file(path: str | os.PathLike) -> dict:
    """{size, sha1}: what a job or a stage records of a file to notice that it changed."""
    size = Path(path).stat().st_size
    return {"size": size, "sha1": file_digest(path, size)}


def parquet_rows(folder: str | os.PathLike, writing: bool = False) -> int:
    """Rows in the Parquet files of `folder`, from their footers. `writing`: the folder is being written, so a file
    without a footer yet (or gone) counts 0 instead of raising."""
    import pyarrow.parquet as pq

    n = 0
    for f in Path(folder).glob("*.parquet"):
        try:
            n += pq.ParquetFile(f).metadata.num_rows
        except Exception:  # noqa: BLE001 - mid-write: counted on the next look
            if not writing:
                raise
    return n
