"""Gather what a report shows from run directories and manifests on the volume.

A report takes run ids (or run directories): eval and probe runs (results.json, told apart by its 'stage'),
calibrate runs (calibration.json) and train runs (metrics.jsonl + config.yaml). Corpus manifests are found from the train runs' configs, or named.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pitlm.errors import PitlmError
from pitlm.volume import Volume


@dataclass
class TrainCurve:
    run_id: str
    name: str
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReportData:
    evals: list[tuple[str, dict]] = field(default_factory=list)           # (run_id, results.json)
    probes: list[tuple[str, dict]] = field(default_factory=list)          # (run_id, results.json of pitlm probe)
    calibrations: list[tuple[str, dict]] = field(default_factory=list)    # (run_id, calibration.json)
    curves: list[TrainCurve] = field(default_factory=list)
    corpora: dict[str, dict] = field(default_factory=dict)                # name -> manifest.json


def resolve_run(vol: Volume, ref: str) -> Path:
    """A run id (or unique prefix) under runs/, or a path to a run directory."""
    p = Path(ref)
    if p.is_dir():
        return p
    root = vol.path("runs")
    exact = root / ref
    if exact.is_dir():
        return exact
    matches = sorted(d for d in root.glob(f"{ref}*") if d.is_dir()) if root.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise PitlmError(f"no run '{ref}' under {root}; see `pitlm runs`")
    raise PitlmError(f"run '{ref}' is ambiguous ({len(matches)} matches); give more of the id")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PitlmError(f"cannot read {path}: {e}") from e


def read_curve(run_dir: Path) -> TrainCurve:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    name = (cfg or {}).get("name") or (cfg or {}).get("run_name") or run_dir.name
    curve = TrainCurve(run_dir.name, str(name))
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a killed job
            step = rec.get("step")
            if step is None:
                continue
            tl = rec.get("train_loss", rec.get("loss"))
            if tl is not None:
                curve.steps.append(int(step))
                curve.train_loss.append(float(tl))
            if rec.get("val_loss") is not None:
                curve.val_steps.append(int(step))
                curve.val_loss.append(float(rec["val_loss"]))
    if (run_dir / "summary.json").is_file():
        curve.summary = _read_json(run_dir / "summary.json")
    return curve


def corpus_names_of(run_dir: Path) -> list[str]:
    if not (run_dir / "config.yaml").is_file():
        return []
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    names = []
    for key in ("corpus", "data"):
        v = cfg.get(key)
        if isinstance(v, str):
            names.append(v)
        elif isinstance(v, dict) and isinstance(v.get("corpus"), str):
            names.append(v["corpus"])
    return names


def collect(vol: Volume, refs: list[str], corpora: list[str] | None = None) -> ReportData:
    data = ReportData()
    corpus_names = list(corpora or [])
    for ref in refs:
        d = resolve_run(vol, ref)
        found = False
        if (d / "results.json").is_file():
            results = _read_json(d / "results.json")
            (data.probes if results.get("stage") == "probe" else data.evals).append((d.name, results))
            found = True
        if (d / "calibration.json").is_file():
            data.calibrations.append((d.name, _read_json(d / "calibration.json")))
            found = True
        if (d / "metrics.jsonl").is_file() and not found:
            data.curves.append(read_curve(d))
            corpus_names += corpus_names_of(d)
            found = True
        if not found:
            raise PitlmError(f"run {d.name} has nothing to report (no results.json, calibration.json or metrics.jsonl)")
    for name in dict.fromkeys(corpus_names):
        manifest = vol.path("corpus", name, "manifest.json")
        if manifest.is_file():
            data.corpora[name] = _read_json(manifest)
    if not (data.evals or data.probes or data.calibrations or data.curves):
        raise PitlmError("nothing to report: give eval, probe, calibrate or train run ids")
    return data
