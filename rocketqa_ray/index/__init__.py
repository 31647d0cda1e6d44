"""FAISS: which index to build (factory), building it (build), holding and searching it (dense), merging shards'
top-k (search), files (store), placing it on GPUs (gpu)."""

from rocketqa_ray.index.dense import DenseIndex

__all__ = ["DenseIndex"]
