"""Saving and loading a DenseIndex: `meta.json` (written last), `ids.parquet` (one string column, in vector order:
columnar, so a reader can take the rows of one shard without parsing the others; indexes of format 1 have
`ids.json`, still read), one `shard_XXXXX.faiss` per shard.

Loading checks everything it can before a search could go wrong: the format version, the query encoder's
dimension and fingerprint against the ones the index was built with, every shard file, and that the
shards hold exactly one vector per id.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rocketqa_ray.config import IndexConfig
from rocketqa_ray.errors import ConfigError, DataError
from rocketqa_ray.index.dense import FORMAT_VERSION, DenseIndex
from rocketqa_ray.index.factory import load_faiss
from rocketqa_ray.io import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)


def save_index(index: DenseIndex, path: str | Path) -> Path:
    """Write `path/` = meta.json + ids.parquet + shard_XXXXX.faiss (CPU indexes), replacing it atomically."""
    faiss = load_faiss()
    path = Path(path)
    meta = index.meta
    shards = index.shards
    meta["files"] = [f"shard_{i:05d}.faiss" for i in range(len(shards))]
    with atomic_dir(path) as tmp:
        # the CPU copies are the source of truth (GPU copies are made from them), so no gpu_to_cpu here
        for name, shard in zip(meta["files"], shards):
            faiss.write_index(shard, str(tmp / name))
        write_ids(tmp / IDS_FILE, index.ids)
        write_json(tmp / "meta.json", meta)  # last: a directory with meta.json is complete
    return path


IDS_FILE = "ids.parquet"
LEGACY_IDS_FILE = "ids.json"  # format 1


def write_ids(path: Path, ids: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": pa.array(ids, pa.string())}), path)


def read_ids(path: Path, hint: str) -> list[str]:
    """The ids of an index folder, in vector order (from ids.parquet, or a format-1 folder's ids.json)."""
    import pyarrow.parquet as pq

    if not (path / IDS_FILE).exists() and (path / LEGACY_IDS_FILE).exists():
        try:
            ids = read_json(path / LEGACY_IDS_FILE)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}/{LEGACY_IDS_FILE} is corrupt ({e}): {hint}") from None
        if not isinstance(ids, list):
            raise DataError(f"{path}/{LEGACY_IDS_FILE} is corrupt (not a list): {hint}")
        return ids
    try:
        return pq.read_table(path / IDS_FILE, columns=["id"]).column("id").to_pylist()
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{path}/{IDS_FILE} is missing or corrupt ({str(e).splitlines()[0][:200]}): {hint}") from None


def load_index(path: str | Path, expect_dim: int | None = None, expect_fingerprint: str | None = None,
               cfg: IndexConfig | None = None) -> DenseIndex:
    """Read an index written by `save`.

    `expect_dim` / `expect_fingerprint` are the query encoder's dimension and `modeling.base.model_fingerprint`;
    a mismatch is a ConfigError. `cfg` overrides the saved search parameters (nprobe, ef_search,
    refine_k_factor, use_gpu); shard_size and the index structure come from the saved index.
    """
    faiss = load_faiss()
    path = Path(path)
    hint = "rebuild it with jobs/index.py"
    if not path.is_dir():
        raise DataError(f"no index at {path} (expected a directory with meta.json): {hint}")
    if not (path / "meta.json").exists():
        raise DataError(f"{path} is not a complete index (meta.json missing): {hint}")
    try:
        meta = read_json(path / "meta.json")
        kind, dim, files = meta["kind"], int(meta["dim"]), list(meta["files"])
        metric = meta.get("metric", "ip")
        params = meta.get("params", {})
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}/meta.json is corrupt ({e}): {hint}") from None
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise DataError(f"{path} was written by a newer rocketqa_ray (format {meta['format_version']})")
    if expect_dim is not None and int(expect_dim) != dim:
        raise ConfigError(
            f"index at {path} has dimension {dim} but the query encoder produces {expect_dim}-d vectors: "
            f"the index was built with another model; {hint}"
        )
    fp = meta.get("model_fingerprint")
    if expect_fingerprint is not None and fp is not None and fp != expect_fingerprint:
        raise ConfigError(
            f"index at {path} was built with another model (fingerprint {fp}), the query encoder is "
            f"{expect_fingerprint}: rebuild the index with jobs/index.py"
        )
    if expect_fingerprint is not None and fp is None:
        log.warning("index at %s records no model fingerprint; cannot check it matches the encoder", path)

    base = IndexConfig()
    for key in ("nprobe", "ef_search", "ef_construction", "refine", "refine_k_factor", "shard_size"):
        if key in params:
            setattr(base, key, params[key])
    base.kind = kind
    if cfg is not None:
        base.nprobe, base.ef_search = cfg.nprobe, cfg.ef_search
        base.refine_k_factor, base.use_gpu = cfg.refine_k_factor, cfg.use_gpu
    ids = read_ids(path, hint)

    shards = []
    for name in files:
        f = path / name
        if not f.exists():
            raise DataError(f"{f} is missing: the index is incomplete; {hint}")
        try:
            shards.append(faiss.read_index(str(f)))
        except RuntimeError as e:
            raise DataError(
                f"{f} is not a readable faiss index ({str(e).splitlines()[0][:200]}): {hint}"
            ) from None
    if not shards:
        raise DataError(f"{path} has no index files: {hint}")
    if any(s.d != dim for s in shards):
        raise DataError(f"{path}: shard dimension does not match meta.json ({dim}): {hint}")
    if sum(s.ntotal for s in shards) != len(ids):
        raise DataError(
            f"{path}: {sum(s.ntotal for s in shards)} vectors but {len(ids)} ids; the index is corrupt: {hint}"
        )
    idx = DenseIndex.from_shards(kind, dim, base, shards, ids, meta.get("factory", ""), fp, metric)
    idx.finalize()
    return idx
