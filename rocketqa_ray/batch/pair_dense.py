"""A dual encoder's score q . p for joined pairs, in the pair flow while each pair has its texts: the dense feature
of a fusion for pairs that are not all among that encoder's mined candidates (step 3's fused fallback scores BM25's
additions and each question's positive too). Both sides are encoded here, so no process looks up the corpus's
embeddings; `pipeline.shared.dense_scores` (stored passage vectors) is the in-process reference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class DenseFeature:
    """Which dual encoder scores the pairs (a stage's model folder) and how it encodes (`EncodeConfig`'s batch size
    and bf16)."""

    model_dir: str
    batch_size: int
    bf16: str


class PairDense:
    """map_batches over joined pairs {query, passage, ...} -> the same rows plus `dense` (float32); one dual encoder
    per actor. A batch's distinct questions are encoded once."""

    def __init__(self, feature: DenseFeature, cpus: float, gpus: float):
        from rocketqa_ray.modeling.dual_encoder import DualEncoder
        from rocketqa_ray.ray_utils import model_in_actor

        self.model, self.device = model_in_actor(DualEncoder, feature.model_dir, cpus, gpus, feature.bf16)
        self.feature = feature

    def __call__(self, batch: pa.Table) -> pa.Table:
        f = self.feature
        queries = batch.column("query").to_pylist()
        distinct = list(dict.fromkeys(queries))
        where = {q: i for i, q in enumerate(distinct)}
        qv = self.model.encode(distinct, "query", f.batch_size, f.bf16, self.device)
        pv = self.model.encode(batch.column("passage").to_pylist(), "passage", f.batch_size, f.bf16, self.device)
        dense = np.einsum("ij,ij->i", qv[[where[q] for q in queries]], pv)
        return batch.append_column("dense", pa.array(dense, pa.float32()))
