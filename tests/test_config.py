"""Config presets, YAML files and `--set` overrides: valid input applies, bad input names what is allowed."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from dataclasses import replace
from pathlib import Path

import pytest

from rocketqa_ray.config import (
    AutoBool,
    Config,
    CrossLoss,
    IndexKind,
    Pooling,
    coerce,
    config_from_dict,
    load_config,
    preset_names,
)
from rocketqa_ray.config_loader import field_help, literal_choices, range_text, type_name
from rocketqa_ray.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["tiny", "cpu", "paper", "medquad"])
def test_presets_load(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    assert name in preset_names()


def test_presets_differ_where_they_should():
    tiny, cpu, paper = load_config("tiny"), load_config("cpu"), load_config("paper")
    assert tiny.model.base == "tiny" and tiny.dual.max_steps == 4
    assert cpu.model.base == "minilm"
    assert paper.dual.batch_size == 512 and paper.ray.use_gpu is True and paper.mining.top_k == 1000


def test_a_preset_extends_another_and_overrides_only_what_it_names(tmp_path, monkeypatch):
    cpu, med = load_config("cpu"), load_config("medquad")
    assert med.data.diagnostic_qrels and not cpu.data.diagnostic_qrels
    assert med.data.path != cpu.data.path
    assert med.cross == cpu.cross
    # the keys medquad.yaml names (chosen on its dev split) and nothing else
    assert med.dual == replace(cpu.dual, continue_epochs=1.0, eval_every=0) != cpu.dual
    assert med.mining == replace(cpu.mining, denoise="none") != cpu.mining
    # a cycle is named instead of recursing forever
    import rocketqa_ray.config as config

    (tmp_path / "a.yaml").write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    with pytest.raises(ConfigError, match="cycle"):
        load_config("a")


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
    ("data.pseudo_fraction=1.5", "data.pseudo_fraction=1.5 is out of range: it must be in [0, 1)"),
    ("mining.denoise_top=500", "mining.denoise_top (500) cannot exceed mining.top_k"),
    ("dual.batch_size=0", "dual.batch_size=0 is out of range: it must be >= 1"),
    ("model.temperature=0", "model.temperature=0.0 is out of range: it must be > 0"),
    ("eval.depth=0", "eval.depth=0 is out of range: it must be >= 1"),
    ("dual.epochs=0", "dual.epochs=0.0 is out of range: it must be > 0"),
    ("dual.lr=-1e-5", "dual.lr=-1e-05 is out of range: it must be > 0"),
    ("cross.lr=0", "cross.lr=0.0 is out of range: it must be > 0"),
    ("mining.denoise_threshold=1.5", "mining.denoise_threshold=1.5 is out of range: it must be in [0, 1]"),
    ("serve.port=70000", "serve.port=70000 is out of range: it must be in [1, 65535]"),
    ("eval.rerank_top_k=500", "eval.rerank_top_k (500) cannot exceed eval.depth"),
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


# ------------------------------------------------------------------ help text and Literal choices, one source each
def _sections():
    hints = typing.get_type_hints(Config)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(Config)]


def _literal_keys():
    """{"section.key": allowed values} for every Literal-typed setting."""
    out = {}
    for name, cls in _sections():
        for key, tp in typing.get_type_hints(cls).items():
            if (choices := literal_choices(tp)) is not None:
                out[f"{name}.{key}"] = choices
    return out


def test_every_setting_has_one_line_help():
    for section in dataclasses.fields(Config):
        assert field_help(section).strip(), f"section {section.name} has no help"
    for name, cls in _sections():
        for f in dataclasses.fields(cls):
            text = field_help(f)
            assert text.strip(), f"{name}.{f.name} has no help text"
            assert "\n" not in text and len(text) < 200, f"{name}.{f.name}: help should be one line"


def test_fixed_choice_settings_are_literals():
    keys = _literal_keys()
    assert keys["model.pooling"] == ("mean", "cls")
    assert keys["cross.loss"] == ("listwise", "bce", "listwise+bce")
    assert keys["dual.init"] == ("base", "previous")
    assert keys["index.kind"] == ("flat", "ivfpq", "hnsw", "auto")
    assert keys["index.refine"] == ("none", "flat", "sq8")
    for dotted in ("dual.bf16", "cross.bf16", "encode.bf16", "index.use_gpu"):
        assert keys[dotted] == ("auto", "true", "false")
    defaults = Config()
    for dotted, allowed in keys.items():  # every default is one of its own choices
        section, key = dotted.split(".")
        assert getattr(getattr(defaults, section), key) in allowed, dotted


@pytest.mark.parametrize("dotted", sorted(_literal_keys()))
def test_literal_choices_are_enforced_and_named(dotted):
    allowed = _literal_keys()[dotted]
    for value in allowed:  # each allowed value is accepted as a --set string
        cfg = load_config("tiny", overrides=[f"{dotted}={value}"])
        section, key = dotted.split(".")
        assert getattr(getattr(cfg, section), key) == value
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=[f"{dotted}=bogus"])
    assert str(e.value) == f"{dotted}='bogus' is not one of: {', '.join(allowed)}"


def test_literal_checked_in_files_and_saved_configs(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("cross:\n  loss: softmax\n")
    with pytest.raises(ConfigError, match=r"cross.loss='softmax' is not one of: listwise, bce, listwise\+bce"):
        load_config("tiny", file=f)
    with pytest.raises(ConfigError, match="index.refine='exact' is not one of: none, flat, sq8"):
        config_from_dict({"index": {"refine": "exact"}})
    # YAML's bool reads as the choice string, in a file as on the command line.
    f.write_text("index:\n  use_gpu: false\n")
    assert load_config("tiny", file=f).index.use_gpu == "false"


def test_coerce_checks_literals_for_other_callers():
    # serve/app.py type-checks its own arguments with coerce, naming the bare key.
    assert coerce("cls", Pooling, "pooling") == "cls"
    assert coerce(True, AutoBool, "bf16") == "true"
    with pytest.raises(ConfigError, match="^kind='lsh' is not one of: flat, ivfpq, hnsw, auto$"):
        coerce("lsh", IndexKind, "kind")
    with pytest.raises(ConfigError, match=r"^loss=\['a'\] is not one of"):
        coerce(["a"], CrossLoss, "loss")


# ------------------------------------------------------------------ `rocketqa-ray config`
def run_config_command(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "rocketqa-ray"
    assert script.exists(), f"{script} missing: pip install -e . --no-deps"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([str(script), "config", *args], capture_output=True, text=True, timeout=120, env=env,
                          cwd=REPO)


def test_config_command_lists_every_key_with_value_type_and_help(tmp_path):
    r = run_config_command("--preset", "cpu", "--set", "dual.lr=2e-5")
    assert r.returncode == 0, r.stderr
    printed: dict[str, dict[str, str]] = {}  # section -> key -> its line
    for line in r.stdout.splitlines():
        if line.startswith("#"):
            continue
        if not line.startswith(" "):
            section = line.split(":")[0]
            printed[section] = {}
        else:
            printed[section][line.split(":")[0].strip()] = line
    assert list(printed) == [name for name, _ in _sections()]
    for name, cls in _sections():
        hints = typing.get_type_hints(cls)
        assert list(printed[name]) == [f.name for f in dataclasses.fields(cls)], name
        for f in dataclasses.fields(cls):
            bounds = f", {range_text(f)}" if range_text(f) else ""
            assert printed[name][f.name].endswith(f"# {type_name(hints[f.name])}{bounds} - {field_help(f)}")
    assert printed["model"]["pooling"].startswith("  pooling: mean ")
    assert "# mean | cls - " in printed["model"]["pooling"]  # a Literal's type is its choices
    assert "# auto | true | false - " in printed["index"]["use_gpu"]
    # It is YAML: saved and loaded back (without the preset) it is the same config, override included.
    saved = tmp_path / "cpu.yaml"
    saved.write_text(r.stdout)
    assert load_config(None, file=saved) == load_config("cpu", overrides=["dual.lr=2e-5"])
    assert load_config(None, file=saved).dual.lr == pytest.approx(2e-5)


def test_config_command_bad_input_is_one_line():
    r = run_config_command("--preset", "cpu", "--set", "model.pooling=max")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["error: model.pooling='max' is not one of: mean, cls"]


def test_every_number_has_a_range_and_values_set_in_code_are_checked_too():
    import dataclasses
    import typing

    from rocketqa_ray.config import Config, validate
    from rocketqa_ray.config_loader import range_text

    unbounded = []
    for sec in dataclasses.fields(Config):
        hints = typing.get_type_hints(sec.type if isinstance(sec.type, type) else type(getattr(Config(), sec.name)))
        for f in dataclasses.fields(getattr(Config(), sec.name)):
            numeric = hints[f.name] in (int, float, int | None, float | None)
            if numeric and f.name != "seed" and not range_text(f):
                unbounded.append(f"{sec.name}.{f.name}")
    assert unbounded == []
    cfg = load_config("tiny")
    cfg.dual.lr = -1.0  # set in code, bypassing --set: validate still refuses it
    with pytest.raises(ConfigError, match=r"dual\.lr=-1\.0 is out of range"):
        validate(cfg)
