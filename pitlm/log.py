"""Logging, progress bars and grep-able summary lines, shared by every stage.

`setup_logging` is called once by the CLI. Stages log through `logging.getLogger("pitlm.<stage>")`, wrap
every loop a person waits on in `progress(...)`, and end with `emit_summary({...})`, which prints
`key: value` lines on stdout (batch jobs grep them from the job log, e.g. `^r2_leakage_off:`).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
_console = Console(stderr=True)
PLAIN_PROGRESS_S = 30.0  # progress_task: seconds between plain progress lines where stderr is not a terminal


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def setup_logging(verbose: bool = False) -> None:
    root = logging.getLogger("pitlm")
    root.handlers.clear()
    level = logging.DEBUG if verbose else logging.INFO
    if not is_rank_zero():
        level = logging.WARNING  # rank-0-only output in distributed runs
    handler = RichHandler(console=_console, show_path=False, rich_tracebacks=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def progress_enabled() -> bool:
    return is_rank_zero() and os.environ.get("PITLM_NO_PROGRESS", "") in ("", "0")


def make_progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=_console, disable=not progress_enabled(), transient=False)


def progress(items: Iterable[T], description: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate with a rich progress bar (rate in `unit`/s); silent off rank 0 or with PITLM_NO_PROGRESS=1."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with make_progress() as bar:
        task = bar.add_task(description, total=total, rate="")
        t0 = time.perf_counter()
        for n, item in enumerate(items, 1):
            yield item
            dt = time.perf_counter() - t0
            bar.update(task, advance=1, rate=f"{n / dt:.1f} {unit}/s" if dt > 0 else "")


@contextmanager
def progress_task(description: str, total: int, unit: str = "it") -> Iterator[Callable[[int], None]]:
    """A progress bar advanced by hand: `with progress_task("purged", 251, "draws") as advance: ... advance(64)`,
    with done/total, rate and ETA. Where stderr is not a terminal (a batch job's log) rich draws only the final
    bar, so a plain line (done/total, rate, ETA) is also printed every PLAIN_PROGRESS_S seconds. Silent off
    rank 0 or with PITLM_NO_PROGRESS=1."""
    enabled = progress_enabled()
    with make_progress() as bar:
        task = bar.add_task(description, total=total, rate="")
        t0 = last = time.perf_counter()
        done = 0

        def advance(n: int = 1) -> None:
            nonlocal done, last
            done += n
            now = time.perf_counter()
            rate = done / (now - t0) if now > t0 else 0.0
            bar.update(task, advance=n, rate=f"{rate:.1f} {unit}/s" if rate else "")
            if enabled and not _console.is_terminal and now - last >= PLAIN_PROGRESS_S:
                last = now
                eta = f"{(total - done) / rate:.0f}s" if rate else "?"
                _console.print(f"{description}: {done}/{total} {unit}, {rate:.1f} {unit}/s, {now - t0:.0f}s "
                               f"elapsed, ETA {eta}", highlight=False, soft_wrap=True)

        yield advance


def format_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    return str(v)


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    return [f"{k}: {format_value(v)}" for k, v in summary.items() if not isinstance(v, dict)]


def emit_summary(summary: Mapping[str, Any], stream=None) -> None:
    """Print grep-able `key: value` lines (rank 0 only); nested dicts are skipped (they live in JSON files)."""
    if not is_rank_zero():
        return
    stream = stream or sys.stdout
    for line in summary_lines(summary):
        print(line, file=stream)
    stream.flush()
