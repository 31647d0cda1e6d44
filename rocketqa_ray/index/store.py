"""Saving and loading a DenseIndex, one shard at a time.

A folder holds `meta.json` (written last), and per shard `shard_XXXXX.faiss` plus `shard_XXXXX.ids.parquet` (that
shard's passage ids, one string column, in vector order). Each shard is complete on its own, so a process that
searches one shard (a searcher actor, a Serve replica) reads only its files, and the shards can be written by
different processes (`batch.index_build`). Older folders are still read: format 2 has one `ids.parquet` for
all shards, format 1 `ids.json`.

Loading checks everything it can before a search could go wrong: the format version, the query encoder's
dimension and fingerprint against the ones the index was built with, every shard file, and that the
shards hold exactly one vector per id.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rocketqa_ray.config import IndexConfig
from rocketqa_ray.errors import ConfigError, DataError
from rocketqa_ray.index.dense import FORMAT_VERSION, DenseIndex
from rocketqa_ray.index.factory import load_faiss
from rocketqa_ray.io import atomic_dir, atomic_path, read_json, write_json

log = logging.getLogger(__name__)

HINT = "rebuild it with jobs/index.py"
IDS_FILE = "ids.parquet"  # format 2
LEGACY_IDS_FILE = "ids.json"  # format 1
SEARCH_KEYS = ("nprobe", "ef_search", "ef_construction", "refine", "refine_k_factor", "shard_size")


def shard_file(j: int) -> str:
    return f"shard_{j:05d}.faiss"


def shard_ids_file(j: int) -> str:
    return f"shard_{j:05d}.ids.parquet"


def save_index(index: DenseIndex, path: str | Path) -> Path:
    """Write `path/` = one .faiss + one ids file per shard, then meta.json, replacing it atomically."""
    path = Path(path)
    sizes = []
    with atomic_dir(path) as tmp:
        # the CPU copies are the source of truth (GPU copies are made from them), so no gpu_to_cpu here
        start = 0
        for j, shard in enumerate(index.shards):
            sizes.append(write_shard(tmp, j, shard, index.ids[start : start + shard.ntotal]))
            start += shard.ntotal
        write_meta(tmp, index.meta, sizes)
    return path


def write_shard(folder: str | Path, j: int, shard: Any, ids: list[str] | pa.Array) -> int:
    """Write shard `j` (a CPU faiss index) and its ids into `folder`, each file atomically; returns its size."""
    faiss = load_faiss()
    folder = Path(folder)
    if shard.ntotal != len(ids):
        raise DataError(f"shard {j}: {shard.ntotal} vectors but {len(ids)} ids")
    with atomic_path(folder / shard_file(j)) as tmp:
        faiss.write_index(shard, str(tmp))
    with atomic_path(folder / shard_ids_file(j)) as tmp:
        pq.write_table(pa.table({"id": pa.array(ids, pa.string())}), tmp)
    return int(shard.ntotal)


def write_meta(folder: str | Path, meta: dict, shard_sizes: list[int]) -> None:
    """meta.json for shards 0..len(shard_sizes)-1: written last, a folder with meta.json is complete."""
    meta = {**meta, "format_version": FORMAT_VERSION, "ntotal": int(sum(shard_sizes)), "shards": len(shard_sizes),
            "shard_sizes": [int(n) for n in shard_sizes],
            "files": [shard_file(j) for j in range(len(shard_sizes))],
            "id_files": [shard_ids_file(j) for j in range(len(shard_sizes))]}
    write_json(Path(folder) / "meta.json", meta)


def read_meta(path: str | Path, expect_dim: int | None = None, expect_fingerprint: str | None = None) -> dict:
    """A saved index's meta.json, checked: complete, readable, not newer than this code, and built for a query
    encoder with `expect_dim` and `expect_fingerprint` (`modeling.base.model_fingerprint`; a mismatch is a
    ConfigError)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"no index at {path} (expected a directory with meta.json): {HINT}")
    if not (path / "meta.json").exists():
        raise DataError(f"{path} is not a complete index (meta.json missing): {HINT}")
    try:
        meta = read_json(path / "meta.json")
        meta["kind"], meta["dim"], meta["files"] = str(meta["kind"]), int(meta["dim"]), list(meta["files"])
        meta.setdefault("metric", "ip")
        meta.setdefault("params", {})
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}/meta.json is corrupt ({e}): {HINT}") from None
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise DataError(f"{path} was written by a newer rocketqa_ray (format {meta['format_version']})")
    dim = meta["dim"]
    if expect_dim is not None and int(expect_dim) != dim:
        raise ConfigError(
            f"index at {path} has dimension {dim} but the query encoder produces {expect_dim}-d vectors: "
            f"the index was built with another model; {HINT}"
        )
    fp = meta.get("model_fingerprint")
    if expect_fingerprint is not None and fp is not None and fp != expect_fingerprint:
        raise ConfigError(
            f"index at {path} was built with another model (fingerprint {fp}), the query encoder is "
            f"{expect_fingerprint}: rebuild the index with jobs/index.py"
        )
    if expect_fingerprint is not None and fp is None:
        log.warning("index at %s records no model fingerprint; cannot check it matches the encoder", path)
    return meta


def search_config(meta: dict, cfg: IndexConfig | None = None) -> IndexConfig:
    """The saved search parameters, with `cfg`'s speed/recall knobs (nprobe, ef_search, refine_k_factor, use_gpu)
    over them; the index structure always comes from the saved index."""
    base = IndexConfig()
    for key in SEARCH_KEYS:
        if key in meta["params"]:
            setattr(base, key, meta["params"][key])
    base.kind = meta["kind"]
    if cfg is not None:
        base.nprobe, base.ef_search = cfg.nprobe, cfg.ef_search
        base.refine_k_factor, base.use_gpu = cfg.refine_k_factor, cfg.use_gpu
    return base


def read_shard(path: str | Path, meta: dict, j: int) -> Any:
    """Shard `j`'s CPU faiss index, checked against meta.json's dimension."""
    faiss = load_faiss()
    f = Path(path) / meta["files"][j]
    if not f.exists():
        raise DataError(f"{f} is missing: the index is incomplete; {HINT}")
    try:
        shard = faiss.read_index(str(f))
    except RuntimeError as e:
        raise DataError(f"{f} is not a readable faiss index ({str(e).splitlines()[0][:200]}): {HINT}") from None
    if shard.d != meta["dim"]:
        raise DataError(f"{path}: shard dimension does not match meta.json ({meta['dim']}): {HINT}")
    return shard


def read_shard_ids(path: str | Path, meta: dict, j: int) -> pa.Array:
    """Shard `j`'s passage ids, in vector order (format 3: its own file; older: its slice of the folder's ids)."""
    path = Path(path)
    if "id_files" not in meta:
        sizes = meta.get("shard_sizes")
        if not sizes or len(sizes) != len(meta["files"]):
            raise DataError(f"{path}/meta.json is corrupt (no shard sizes): {HINT}")
        start = sum(sizes[:j])
        return pa.array(read_ids(path)[start : start + sizes[j]], pa.string())
    f = path / meta["id_files"][j]
    try:
        return pq.read_table(f, columns=["id"]).column("id").combine_chunks()
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{f} is missing or corrupt ({str(e).splitlines()[0][:200]}): {HINT}") from None


def read_ids(path: Path) -> list[str]:
    """The ids of a format-1 or -2 index folder, in vector order (ids.parquet, or ids.json)."""
    if not (path / IDS_FILE).exists() and (path / LEGACY_IDS_FILE).exists():
        try:
            ids = read_json(path / LEGACY_IDS_FILE)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}/{LEGACY_IDS_FILE} is corrupt ({e}): {HINT}") from None
        if not isinstance(ids, list):
            raise DataError(f"{path}/{LEGACY_IDS_FILE} is corrupt (not a list): {HINT}")
        return ids
    try:
        return pq.read_table(path / IDS_FILE, columns=["id"]).column("id").to_pylist()
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{path}/{IDS_FILE} is missing or corrupt ({str(e).splitlines()[0][:200]}): {HINT}") from None


def load_index(path: str | Path, expect_dim: int | None = None, expect_fingerprint: str | None = None,
               cfg: IndexConfig | None = None) -> DenseIndex:
    """Read a whole index written by `save` (every shard, in this process).

    `expect_dim` / `expect_fingerprint` are the query encoder's (`read_meta`). `cfg` overrides the saved search
    parameters (`search_config`).
    """
    path = Path(path)
    meta = read_meta(path, expect_dim, expect_fingerprint)
    if not meta["files"]:
        raise DataError(f"{path} has no index files: {HINT}")
    if "id_files" in meta:
        shards, ids = [], []
        for j in range(len(meta["files"])):
            shards.append(read_shard(path, meta, j))
            part = read_shard_ids(path, meta, j)
            if len(part) != shards[-1].ntotal:
                raise DataError(f"{path}: shard {j} has {shards[-1].ntotal} vectors but {len(part)} ids; the index "
                                f"is corrupt: {HINT}")
            ids.extend(part.to_pylist())
    else:
        ids = read_ids(path)
        shards = [read_shard(path, meta, j) for j in range(len(meta["files"]))]
    if sum(s.ntotal for s in shards) != len(ids):
        raise DataError(
            f"{path}: {sum(s.ntotal for s in shards)} vectors but {len(ids)} ids; the index is corrupt: {HINT}"
        )
    base = search_config(meta, cfg)
    idx = DenseIndex.from_shards(meta["kind"], meta["dim"], base, shards, ids, meta.get("factory", ""),
                                 meta.get("model_fingerprint"), meta["metric"])
    idx.finalize()
    return idx
