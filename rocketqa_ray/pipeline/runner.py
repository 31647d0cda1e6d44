"""Runs the registered stages in order, resumably.

Each stage writes into RUN_DIR/<stage>/ and marks itself complete (`_COMPLETE.json`, written last and
atomically) with a fingerprint of the config sections it reads and of its upstream stages. A rerun skips
complete stages with the same fingerprint and refuses to mix runs when the fingerprint changed.
Inside a stage, the heavy parts resume on their own (encoding/scoring shards, training checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from rocketqa_ray.config import Config, stable_sections
from rocketqa_ray.console import run_logging, say
from rocketqa_ray.errors import StageConfigChanged
from rocketqa_ray.io import read_json_if_valid, write_json
from rocketqa_ray.pipeline.context import Context
from rocketqa_ray.pipeline.integrity import (
    check_inputs,
    check_outputs,
    input_files,
    input_record,
    output_record,
)
from rocketqa_ray.pipeline.registry import Stage, StageResult, stage_names, stages
from rocketqa_ray.ray_utils import ray_scope

COMPLETE = "_COMPLETE.json"


class Pipeline:
    """The whole job over one RUN_DIR: `run()` runs the configured stages (and their upstream ones) in order."""

    def __init__(self, cfg: Config, run_dir: str | Path, preset: str | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.preset = preset
        self.ctx = Context(cfg, self.run_dir)
        self.results: dict[str, StageResult] = {}
        self._digests: dict[str, str] = {}
        self._inputs: dict[str, dict] | None = None
        self._stages = stages()

    @property
    def data_files(self) -> dict[str, Path]:
        c = self.cfg.data
        return input_files(c.path, (c.train_split, c.test_split), c.unlabeled_queries)

    @property
    def inputs(self) -> dict[str, dict]:
        """What the dataset files are now (hashed once per run): every stage records it and checks it on resume."""
        if self._inputs is None:
            self._inputs = input_record(self.data_files)
        return self._inputs

    def stage_fingerprint(self, st: Stage) -> dict:
        """What a completed stage must match to be reused: its config sections and its upstream stages' digests."""
        sections = stable_sections(self.cfg, *st.sections, ignore=st.ignores)
        # Which data a stage read is checked by content (`integrity`), so the same data under another path
        # spelling, or in the copy `ray job submit` unpacks, is not a changed config.
        sections.get("data", {}).pop("path", None)
        if st.variant:
            sections["variant"] = st.name
        deps = {d: self._digests[d] for d in st.deps if d in self._digests}
        return {"config": sections, "deps": deps}

    def run_stage(self, name: str) -> StageResult:
        if name in self.results:
            return self.results[name]
        st = self._stages[name]
        for dep in st.deps:
            self.run_stage(dep)
        d = self.run_dir / name
        fp = self.stage_fingerprint(st)
        digest = hashlib.sha1(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:16]
        marker = d / COMPLETE
        done = read_json_if_valid(marker)
        if done is None and marker.exists():
            say("stage %s: its completion marker %s is empty or damaged; running the stage again", name, marker)
        if done is not None:
            if done.get("digest") != digest:
                stored = done.get("fingerprint", {})
                if not same_reads(stored, fp):
                    raise StageConfigChanged(
                        f"stage '{name}' in {d} was completed with a different config ({diff(project(stored, fp), fp)}); "
                        f"use a new --out directory, or delete {d} (and the stages after it) to redo it"
                    )
                digest = done["digest"]  # the stages after it recorded this one: they stay valid
            check_inputs(name, d, done.get("inputs", {}), self.inputs, self.data_files)
            check_outputs(name, d, done.get("outputs", {}))
            say("stage %s: already complete, skipping (%.0f s before)", name, done.get("seconds", 0))
            res = StageResult(done.get("metrics", {}), done.get("stats", {}), done.get("seconds", 0.0))
        else:
            say("stage %s: starting", name)
            t0 = time.time()
            d.mkdir(parents=True, exist_ok=True)
            try:
                res = st.run(self.ctx, self.cfg, d)
            finally:
                self.ctx.close()
            res.seconds = round(time.time() - t0, 1)
            write_json(marker, {"stage": name, "digest": digest, "fingerprint": fp, "metrics": res.metrics,
                                "stats": res.stats, "seconds": res.seconds, "inputs": self.inputs,
                                "outputs": output_record(d, skip={COMPLETE})})
            say("stage %s: done in %.0f s %s", name, res.seconds, json.dumps(res.metrics))
        self._digests[name] = digest
        self.results[name] = res
        return res

    def run(self, names: list[str] | None = None) -> dict:
        """Run the stages; while they run, Ray's and the libraries' output goes to RUN_DIR/logs/ and the
        terminal shows the stage lines and progress (`console.run_logging`). A Ray cluster started by the run
        is shut down at its end."""
        names = list(names or self.cfg.pipeline.stages)
        if self.cfg.pipeline.ablations:
            names += [a for a in stage_names(ablations=True) if a not in names]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with run_logging(self.run_dir), ray_scope():
            saved = self.cfg.to_dict()
            saved["data"]["path"] = str(Path(self.cfg.data.path).resolve())
            write_json(self.run_dir / "config.json", saved)
            order = list(self._stages)
            for name in sorted(names, key=order.index):
                self.run_stage(name)
                self.write_report()
            report = self.write_report()
            if report["budget"].get("over_minutes", 0) > 0:
                b = report["budget"]
                say("the stages took %.1f min, %.1f min over the %g minutes this preset is sized for "
                    "(pipeline.budget_minutes; see README 'Your own data' for the knobs that scale with data size)",
                    b["minutes"], b["over_minutes"], b["budget_minutes"])
            return report

    def write_report(self) -> dict:
        from rocketqa_ray.pipeline.report import write_reports

        order = [s for s in self._stages if s in self.results]
        splits = self.ctx.splits
        report = {
            "stages": {s: self.results[s].metrics for s in order if self.results[s].metrics},
            "stats": {s: self.results[s].stats for s in order if self.results[s].stats},
            "timings_s": {s: r.seconds for s, r in self.results.items()},
            "data": str(self.cfg.data.path),
            "preset": self.preset,
            "splits": {"train": len(splits.train), "pseudo": len(splits.pseudo), "dev": len(splits.dev),
                       "test": len(splits.test)},
            "budget": budget(sum(r.seconds for r in self.results.values()), self.cfg.pipeline.budget_minutes),
        }
        write_json(self.run_dir / "report.json", report)
        write_reports(report, self.run_dir)
        return report


def project(stored: dict, fp: dict) -> dict:
    """`stored` cut down to the keys `fp` has: a fingerprint recorded when the stage declared wider sections
    (before a section was narrowed to the keys it reads) keeps keys the stage no longer reads."""
    if not isinstance(stored, dict) or not isinstance(fp, dict):
        return stored
    return {k: project(stored[k], v) if k in stored else None for k, v in fp.items()}


def same_reads(stored: dict, fp: dict) -> bool:
    """Whether a stage completed under the fingerprint `stored` computed what it would compute now: the same
    value for every key it reads now, the same upstream stages."""
    return project(stored, fp) == fp


def diff(old: dict, new: dict, prefix: str = "") -> str:
    """First few differing keys between two fingerprints, as 'a.b: old -> new'."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = diff(a, b, f"{prefix}{k}.")
            if sub:
                out.append(sub)
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return "; ".join(out[:5])


def budget(seconds: float, budget_minutes: float | None) -> dict:
    """The stages' total time against the preset's budget (`pipeline.budget_minutes`), for the report."""
    out: dict = {"minutes": round(seconds / 60, 1)}
    if budget_minutes:
        out.update(budget_minutes=budget_minutes, over_minutes=round(max(0.0, seconds / 60 - budget_minutes), 1))
    return out
