"""The one split of a dataset's questions into train / pseudo (step 4's unlabelled) / dev / test.

Every consumer (the pipeline, `jobs/train_dual.py`, the cross-encoder's calibration groups) calls these
functions, so a question is held out the same way everywhere.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rocketqa_ray.data.beir import BeirData, load_queries
from rocketqa_ray.errors import DataError

if TYPE_CHECKING:
    from rocketqa_ray.config import DataConfig


@dataclass
class Splits:
    train: list[str]  # labelled training questions
    pseudo: list[str]  # questions whose labels are hidden (step 4's unlabelled questions)
    dev: list[str]
    test: list[str]
    unlabeled_texts: dict[str, str] = field(default_factory=dict)  # from a user's file, if given


def holdout(qids: list[str], fractions: dict[str, float], seed: int = 0) -> dict[str, list[str]]:
    """Deterministically split `qids` into named parts by fraction; the rest is 'rest'."""
    rng = random.Random(seed)
    order = sorted(qids)
    rng.shuffle(order)
    out: dict[str, list[str]] = {}
    start = 0
    for name, frac in fractions.items():
        n = int(round(frac * len(order)))
        out[name] = sorted(order[start : start + n])
        start += n
    out["rest"] = sorted(order[start:])
    return out


def load_unlabeled(path: str) -> dict[str, str]:
    """{qid: text} from a JSONL of questions without labels (`_id`, `text`)."""
    qs = load_queries(path)
    return {q: v["text"] for q, v in qs.items()}


def split_questions(data: BeirData, cfg: DataConfig) -> Splits:
    """Hold out `dev_fraction` (labels kept, for choosing settings) and, unless `unlabeled_queries` names a file,
    `pseudo_fraction` (labels hidden: step 4's questions) of the training split; cap the rest at
    `max_train_queries`. `test` is empty when the test split's qrels were not loaded."""
    train_all = sorted(data.split(cfg.train_split))
    fracs = {"dev": cfg.dev_fraction}
    if not cfg.unlabeled_queries:
        fracs["pseudo"] = cfg.pseudo_fraction
    parts = holdout(train_all, fracs, seed=cfg.seed)
    train = parts["rest"]
    if cfg.max_train_queries:
        train = train[: cfg.max_train_queries]
        for held in ("pseudo", "dev"):  # held-out sets shrink with the training set
            if held in parts:
                parts[held] = parts[held][: max(1, cfg.max_train_queries // 2)]
    if not train:
        raise DataError("no labelled training questions left after holding out dev/pseudo fractions")
    unl = load_unlabeled(cfg.unlabeled_queries) if cfg.unlabeled_queries else {}
    return Splits(train=train, pseudo=parts.get("pseudo", sorted(unl)), dev=parts["dev"],
                  test=sorted(data.qrels.get(cfg.test_split, {})), unlabeled_texts=unl)
