"""The one split of training questions (train / pseudo / dev), used by the pipeline and jobs/train_dual.py alike."""

from __future__ import annotations

import json

import pytest

from rocketqa_ray.config import DataConfig
from rocketqa_ray.data.beir import load_beir
from rocketqa_ray.data.splits import holdout, split_questions
from rocketqa_ray.errors import DataError


def test_holdout_deterministic_and_disjoint():
    qids = [f"q{i}" for i in range(100)]
    a = holdout(qids, {"dev": 0.1, "pseudo": 0.3}, seed=1)
    b = holdout(list(reversed(qids)), {"dev": 0.1, "pseudo": 0.3}, seed=1)
    assert a == b
    assert (len(a["dev"]), len(a["pseudo"]), len(a["rest"])) == (10, 30, 60)
    assert set(a["dev"]) | set(a["pseudo"]) | set(a["rest"]) == set(qids)
    assert holdout(qids, {"dev": 0.1}, seed=2)["dev"] != a["dev"]


def test_split_questions_on_squad_mini(mini_data_dir):
    data = load_beir(mini_data_dir)
    cfg = DataConfig(path=mini_data_dir, dev_fraction=0.1, pseudo_fraction=0.3)
    s = split_questions(data, cfg)
    train_all = set(data.split("train"))
    assert set(s.train) | set(s.pseudo) | set(s.dev) == train_all
    assert not (set(s.train) & set(s.pseudo)) and not (set(s.train) & set(s.dev)) and not (set(s.pseudo) & set(s.dev))
    assert len(s.dev) == round(0.1 * len(train_all)) and len(s.pseudo) == round(0.3 * len(train_all))
    assert s.test == sorted(data.split("test"))
    assert split_questions(data, cfg) == s  # deterministic
    capped = split_questions(data, DataConfig(path=mini_data_dir, pseudo_fraction=0.3, max_train_queries=50))
    assert len(capped.train) == 50
    assert len(capped.pseudo) == 25 and set(capped.pseudo) <= set(split_questions(data, DataConfig(
        path=mini_data_dir, pseudo_fraction=0.3)).pseudo)


def test_unlabeled_file_replaces_the_pseudo_fraction(mini_data_dir, tmp_path):
    data = load_beir(mini_data_dir)
    f = tmp_path / "unlabeled.jsonl"
    f.write_text("".join(json.dumps({"_id": f"u{i}", "text": f"question {i}?"}) + "\n" for i in range(7)))
    s = split_questions(data, DataConfig(path=mini_data_dir, pseudo_fraction=0.3, unlabeled_queries=str(f)))
    assert s.pseudo == sorted(f"u{i}" for i in range(7))
    assert s.unlabeled_texts["u3"] == "question 3?"
    # no labelled question is hidden when a file is given; only the dev split is held out
    assert s.dev and set(s.train) | set(s.dev) == set(data.split("train")) and not set(s.train) & set(s.dev)


def test_no_training_question_left_is_an_error(mini_data_dir):
    data = load_beir(mini_data_dir)
    with pytest.raises(DataError, match="no labelled training questions"):
        split_questions(data, DataConfig(path=mini_data_dir, dev_fraction=0.5, pseudo_fraction=0.5))
