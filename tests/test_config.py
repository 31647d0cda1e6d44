"""Config presets, YAML files and `--set` overrides: valid input applies, bad input names what is allowed."""

from __future__ import annotations

import pytest

from rocketqa_ray.config import Config, config_from_dict, load_config, preset_names
from rocketqa_ray.errors import ConfigError


@pytest.mark.parametrize("name", ["tiny", "cpu", "paper"])
def test_presets_load(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    assert name in preset_names()


def test_presets_differ_where_they_should():
    tiny, cpu, paper = load_config("tiny"), load_config("cpu"), load_config("paper")
    assert tiny.model.base == "tiny" and tiny.dual.max_steps == 4
    assert cpu.model.base == "minilm"
    assert paper.dual.batch_size == 512 and paper.ray.use_gpu is True and paper.mining.top_k == 1000


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*cpu.*paper.*tiny"):
        load_config("nope")


def test_overrides_coerce_types():
    cfg = load_config("tiny", overrides=[
        "dual.lr=2e-5", "dual.batch_size=16", "model.normalize=false", "dual.max_steps=null",
        "model.temperature=1", "data.unlabeled_queries=/tmp/q.jsonl", "dual.bf16=true",
        "pipeline.stages=bm25,md0",
    ])
    assert cfg.dual.lr == pytest.approx(2e-5) and isinstance(cfg.dual.lr, float)
    assert cfg.dual.batch_size == 16 and isinstance(cfg.dual.batch_size, int)
    assert cfg.model.normalize is False
    assert cfg.dual.max_steps is None
    assert cfg.model.temperature == 1.0 and isinstance(cfg.model.temperature, float)  # int -> float is lossless
    assert cfg.data.unlabeled_queries == "/tmp/q.jsonl"
    assert cfg.dual.bf16 == "true"  # YAML's bool true becomes the choice string "true"
    assert cfg.pipeline.stages == ["bm25", "md0"]


def test_later_override_wins():
    cfg = load_config("tiny", overrides=["dual.lr=1e-4", "dual.lr=5e-5"])
    assert cfg.dual.lr == pytest.approx(5e-5)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=["dual.learning_rate=1e-5"])
    msg = str(e.value)
    assert "dual.learning_rate" in msg
    for key in ("lr", "batch_size", "cross_batch", "grad_cache"):
        assert key in msg


def test_unknown_section_lists_sections():
    with pytest.raises(ConfigError, match="unknown config section 'trainer'.*dual.*mining.*serve"):
        load_config("tiny", overrides=["trainer.lr=1"])


@pytest.mark.parametrize("override, expect", [
    ("dual.batch_size=big", "dual.batch_size: expected an integer, got 'big'"),
    ("dual.batch_size=1.5", "dual.batch_size: expected an integer"),
    ("dual.lr=fast", "dual.lr: expected a number"),
    ("model.normalize=maybe", "model.normalize: expected true/false"),
    ("dual.batch_size=true", "dual.batch_size: expected an integer"),
    ("pipeline.stages={a: 1}", "pipeline.stages: expected a list"),
])
def test_wrong_type_message(override, expect):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=[override])
    assert expect in str(e.value)


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config("tiny", overrides=["lr=3"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config("tiny", overrides=["dual.lr"])


def test_section_must_be_mapping(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("dual: 3\n")
    with pytest.raises(ConfigError, match="section 'dual' must be a mapping"):
        load_config("tiny", file=f)


@pytest.mark.parametrize("override, expect", [
    ("model.pooling=max", "model.pooling='max' is not one of: mean, cls"),
    ("index.kind=lsh", "index.kind='lsh' is not one of"),
    ("dual.bf16=sometimes", "dual.bf16='sometimes' is not one of: auto, true, false"),
    ("pipeline.stages=bm25,md9", "unknown stage 'md9'"),
    ("data.pseudo_fraction=1.5", "data.pseudo_fraction=1.5 must be in [0, 1)"),
    ("mining.denoise_top=500", "mining.denoise_top (500) cannot exceed mining.top_k"),
    ("dual.batch_size=0", "dual.batch_size must be at least 1"),
    ("model.temperature=0", "model.temperature must be > 0"),
])
def test_invalid_choices(override, expect):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=[override])
    assert expect in str(e.value)


def test_yaml_file_over_preset_and_overrides_over_file(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("dual:\n  lr: 1.0e-4\n  batch_size: 4\nmining:\n  top_k: 7\n  denoise_top: 3\n")
    cfg = load_config("tiny", file=f, overrides=["dual.batch_size=6"])
    assert cfg.dual.lr == pytest.approx(1e-4)
    assert cfg.dual.batch_size == 6  # --set beats the file
    assert cfg.mining.top_k == 7
    assert cfg.model.base == "tiny"  # untouched preset values stay


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("tiny", file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dual: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("tiny", file=bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("dual:\n  nesterov: true\n")
    with pytest.raises(ConfigError, match="unknown config key 'dual.nesterov'"):
        load_config("tiny", file=wrong)


def test_round_trip_through_dict():
    cfg = load_config("paper", overrides=["dual.lr=1e-5"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
