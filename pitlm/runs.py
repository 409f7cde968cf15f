"""Run directories: one per invocation, `runs/<stage>-<UTC timestamp>-<short id>/`, holding the resolved
config (config.yaml), a log file (log.txt), metrics.jsonl (one JSON object per logged step) and
summary.json (the stage's final `key: value` lines, plus status and wall time).

    with start_run(vol, "train", cfg) as run:
        run.log_metrics(step=10, loss=3.2)
        run.finish({"val_loss_final": 2.9})
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from pitlm.log import emit_summary, format_value, is_rank_zero
from pitlm.secrets import Redactor
from pitlm.volume import Volume, atomic_write_json, atomic_write_text, package_versions


class Run:
    def __init__(self, directory: Path, stage: str):
        self.dir = directory
        self.stage = stage
        self.id = directory.name
        self.t0 = time.time()
        self.summary: dict[str, Any] = {}
        self._metrics = None

    def log_metrics(self, **metrics: Any) -> None:
        if not is_rank_zero():
            return
        if self._metrics is None:
            self._metrics = open(self.dir / "metrics.jsonl", "a")
        self._metrics.write(json.dumps({"time": round(time.time() - self.t0, 3), **metrics}, default=float) + "\n")
        self._metrics.flush()

    def save_json(self, name: str, obj: Any) -> Path:
        return atomic_write_json(self.dir / name, obj)

    def finish(self, summary: dict[str, Any], print_lines: bool = True) -> None:
        """Record and print the stage's final key: value lines."""
        self.summary.update(summary)
        if print_lines:
            emit_summary(summary)

    def _close(self, status: str, error: str | None = None) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if not is_rank_zero():
            return
        atomic_write_json(self.dir / "summary.json", Redactor().obj({
            "run_id": self.id, "stage": self.stage, "status": status, "error": error,
            "wall_seconds": round(time.time() - self.t0, 3), "versions": package_versions(), **self.summary}))


class _RedactingFormatter(logging.Formatter):
    """log.txt lines with secrets replaced (a stage may log its own arguments)."""

    def __init__(self, fmt: str):
        super().__init__(fmt)
        self.redactor = Redactor()

    def format(self, record: logging.LogRecord) -> str:
        return self.redactor.text(super().format(record))


def new_run_id(stage: str) -> str:
    return f"{stage}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"


@contextmanager
def start_run(vol: Volume, stage: str, config: BaseModel | dict | None = None,
              run_id: str | None = None) -> Iterator[Run]:
    """Create the run directory, save the resolved config, attach a file log; on exit write summary.json
    with status ok/failed."""
    vol.ensure()
    directory = vol.path("runs", run_id or new_run_id(stage))
    directory.mkdir(parents=True, exist_ok=True)
    if config is not None and is_rank_zero():
        # redacted as data, so that config.yaml stays valid YAML ('***', not an alias)
        if isinstance(config, BaseModel):
            text = yaml.safe_dump(Redactor().obj(config.model_dump(mode="json")), sort_keys=False)
        else:
            text = json.dumps(Redactor().obj(config), indent=2, default=str)
        atomic_write_text(directory / "config.yaml", text)
    logger = logging.getLogger("pitlm")
    handler = logging.FileHandler(directory / "log.txt")
    handler.setFormatter(_RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    run = Run(directory, stage)
    logger.info("run directory: %s", directory)
    try:
        yield run
    except BaseException as e:
        run._close("failed", f"{type(e).__name__}: {e}")
        raise
    else:
        run._close("ok")
    finally:
        logger.removeHandler(handler)
        handler.close()


def list_runs(vol: Volume) -> list[dict[str, Any]]:
    """Every run on the volume with its stage, status and headline summary, newest first."""
    root = vol.path("runs")
    rows = []
    if not root.is_dir():
        return rows
    for d in sorted(root.iterdir(), reverse=True):
        if not d.is_dir() or d.name.startswith("."):
            continue
        row: dict[str, Any] = {"run_id": d.name, "stage": d.name.split("-")[0], "status": "running?"}
        for name in ("summary.json", "job.json"):
            f = d / name
            if f.is_file():
                try:
                    row.update(json.loads(f.read_text()))
                except json.JSONDecodeError:
                    row["status"] = "corrupt"
        rows.append(row)
    return rows


HEADLINE_KEYS = ("backend", "state", "leakage_premium", "premium_reduction", "val_loss_final", "train_loss_final",
                 "tokens_train", "docs_kept", "rows", "exit_code")
# The grep-able lines the seed's wait-jobs.sh pulled from job logs (`pitlm jobs wait` tabulates them).
HEADLINE_METRICS = ("r2_leakage_off", "r2_leakage_on", "leakage_premium", "premium_reduction", "val_loss_final",
                    "peak_vram_mb")


def headline(row: dict[str, Any]) -> str:
    parts = [f"{k}={format_value(row[k])}" for k in HEADLINE_KEYS if k in row and row[k] is not None]
    metrics = row.get("metrics")
    if isinstance(metrics, dict):  # a batch job's captured summary: the headline metrics first
        keys = [k for k in HEADLINE_METRICS if k in metrics] or list(metrics)[:4]
        parts += [f"{k}={format_value(metrics[k])}" for k in keys]
    return " ".join(parts)
