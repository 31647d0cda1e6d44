"""The plain data shapes passed between steps (Ray-free, no behaviour)."""

from __future__ import annotations

from typing import Literal

Qrels = dict[str, dict[str, int]]  # {qid: {pid: relevance > 0}}
Run = dict[str, dict[str, float]]  # {qid: {pid: score}}: what metrics and TREC files take
RankedIds = dict[str, list[str]]  # {qid: [pid, ...]} best first: mined candidates, denoised pools
RankedHits = dict[str, list[tuple[str, float]]]  # {qid: [(pid, score), ...]} best first: a retriever's output
PairScores = dict[tuple[str, str], float]  # {(qid, pid): score}: cross-encoder probabilities, fused scores

# One list each for the config's fixed choices and the core that acts on them.
DenoiseKind = Literal["threshold", "relative", "margin", "none"]  # step 3's rule for a likely false negative
DistillKind = Literal["none", "kl", "margin_mse"]  # the soft-target loss added to the contrastive one
