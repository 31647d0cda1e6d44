"""What a completed stage must still find before a rerun may skip it: its outputs as it wrote them and the
dataset files as it read them.

At completion a stage's marker records, for every file in its folder, the size and a content hash (of the whole
file when small, of its first and last MiBs when large); and the same for every dataset file the run reads, by
role (corpus, queries, qrels of a split), not by path: the same data reached through another path spelling, or
copied with the checkout by `ray job submit`, is the same data. A rerun checks both. A damaged output or an edited dataset file is a clear error that names the file and how to redo the
stage, never a stage skipped on trust (and nothing is deleted: the user decides).
"""

from __future__ import annotations

from pathlib import Path

from rocketqa_ray.data.beir import find_corpus
from rocketqa_ray.errors import DataError
from rocketqa_ray.io import describe_file


def output_record(stage_dir: Path, skip: set[str]) -> dict[str, dict]:
    """{relative path: size and hash} of every file under a finished stage's folder (without `skip` names and the
    temp files of killed writers)."""
    out = {}
    for p in sorted(stage_dir.rglob("*")):
        if p.is_file() and p.name not in skip and not p.name.startswith("."):
            out[str(p.relative_to(stage_dir))] = describe_file(p)
    return out


def input_files(data_path: str | Path, splits: tuple[str, ...], unlabeled: str | None = None) -> dict[str, Path]:
    """{role: file} of the dataset files a run reads: the corpus, queries.jsonl, the splits' qrels, the file of
    unlabelled questions if given."""
    root = Path(data_path)
    files = {"corpus": find_corpus(root), "queries": root / "queries.jsonl",
             **{f"qrels/{s}.tsv": root / "qrels" / f"{s}.tsv" for s in splits}}
    if unlabeled:
        files["unlabeled"] = Path(unlabeled)
    return {role: f for role, f in files.items() if f.exists()}


def input_record(files: dict[str, Path]) -> dict[str, dict]:
    return {role: describe_file(f) for role, f in files.items()}


def changed_inputs(recorded: dict[str, dict], current: dict[str, dict]) -> list[str]:
    """Roles of the dataset files whose content differs from what a stage read (a touch or a copy is no change)."""
    return [role for role, was in recorded.items() if current.get(role) != was]


def check_outputs(stage: str, stage_dir: Path, recorded: dict[str, dict]) -> None:
    """A DataError naming the first output file of a completed stage that is missing or no longer what it wrote."""
    redo = (f"delete {stage_dir} (and the stages after it) and rerun the same command to redo it, or use a new "
            "--out directory")
    for rel, was in recorded.items():
        p = stage_dir / rel
        if not p.is_file():
            raise DataError(f"stage '{stage}' is complete but its output {p} is missing; {redo}")
        now = describe_file(p)
        if now != was:
            raise DataError(f"stage '{stage}' is complete but its output {p} is damaged ({now['size']} bytes, "
                            f"{was['size']} when written); {redo}")


def check_inputs(stage: str, stage_dir: Path, recorded: dict[str, dict], current: dict[str, dict],
                 files: dict[str, Path]) -> None:
    changed = changed_inputs(recorded, current)
    if changed:
        what = files.get(changed[0], changed[0])
        more = f" (and {len(changed) - 1} more file(s))" if len(changed) > 1 else ""
        raise DataError(f"stage '{stage}' in {stage_dir} was computed from other data: {what} changed since{more}; "
                        f"its results would not match. Delete {stage_dir} "
                        "(and the stages after it) to redo it with the data as it is now, or use a new --out directory")
