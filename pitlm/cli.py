"""The `pitlm` command line. Subcommands mirror the pipeline stages; each stage owns its own typer app in
`pitlm/<stage>/cli.py` and this file only wires them together.

Errors that the user can fix (`PitlmError`) print one line `error: ...` and exit non-zero.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from pitlm.cliutil import State, volume
from pitlm.errors import PitlmError
from pitlm.log import setup_logging

app = typer.Typer(help="pitlm: point-in-time language models and calibrated look-ahead leakage measurement.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
bench_app = typer.Typer(help="Performance benchmarks (record results in BENCHMARKS.md).", no_args_is_help=True)


@app.callback()
def _root(ctx: typer.Context,
          home: Annotated[str | None, typer.Option("--home", help="Cache root (default $PITLM_HOME or ~/.cache/pitlm).")] = None,
          require_persistent: Annotated[bool, typer.Option("--require-persistent", help="Refuse to run long stages when PITLM_HOME is ephemeral (also PITLM_REQUIRE_PERSISTENT=1).")] = False,
          verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    ctx.obj = State(home=home or os.environ.get("PITLM_HOME"), require_persistent=require_persistent, verbose=verbose)
    setup_logging(verbose)


@app.command()
def doctor(ctx: typer.Context) -> None:
    """Versions, hardware, fast kernels, the volume and its persistence, credentials, batch CLIs."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from pitlm.doctor import run_checks

    checks = run_checks(volume(ctx))
    table = Table(title="pitlm doctor", show_lines=False)
    for col in ("check", "status", "detail", "fix"):
        table.add_column(col, overflow="fold")
    colour = {"ok": "green", "warn": "yellow", "fail": "red", "info": "cyan"}
    for c in checks:
        table.add_row(escape(c.name), f"[{colour[c.status]}]{c.status}[/]", escape(c.detail), escape(c.hint))
    Console(width=140).print(table)
    failed = [c.name for c in checks if c.status == "fail"]
    vol = volume(ctx)
    print(f"pitlm_home: {vol.root}")
    print(f"persistent: {str(vol.persistence().persistent).lower()}")
    print(f"doctor_checks: {len(checks)}")
    print(f"doctor_failed: {len(failed)}")
    if failed:
        raise typer.Exit(1)


runs_app = typer.Typer(help="List and show runs on the volume.", invoke_without_command=True)


@runs_app.callback()
def _runs(ctx: typer.Context,
          limit: Annotated[int, typer.Option(help="Show at most this many runs.")] = 30,
          stage: Annotated[str | None, typer.Option(help="Only runs of this stage.")] = None) -> None:
    """List runs (newest first) with stage, status and headline metrics."""
    if ctx.invoked_subcommand:
        return
    from pitlm.runs import headline, list_runs

    rows = [r for r in list_runs(volume(ctx)) if stage is None or r["stage"] == stage][:limit]
    if not rows:
        print(f"no runs under {volume(ctx).path('runs')}")
        return
    for r in rows:
        print(f"{r['run_id']:<44} {str(r.get('status', '?')):<9} {headline(r)}")


@runs_app.command("show")
def runs_show(ctx: typer.Context, run_id: Annotated[str, typer.Argument(help="Run id (prefix ok).")]) -> None:
    """Show one run: its summary, config and the files in it."""
    import json

    root = volume(ctx).path("runs")
    matches = sorted(p for p in root.glob(f"{run_id}*") if p.is_dir()) if root.is_dir() else []
    if not matches:
        raise PitlmError(f"no run matching '{run_id}' under {root}; see `pitlm runs`")
    if len(matches) > 1 and not any(m.name == run_id for m in matches):
        raise PitlmError(f"'{run_id}' matches {len(matches)} runs; give more of the id")
    d = next((m for m in matches if m.name == run_id), matches[0])
    print(f"run: {d.name}\npath: {d}")
    for name in ("summary.json", "job.json"):
        if (d / name).is_file():
            for k, v in json.loads((d / name).read_text()).items():
                print(f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    if (d / "config.yaml").is_file():
        print("--- config.yaml\n" + (d / "config.yaml").read_text().rstrip())
    print("--- files\n" + "\n".join(sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())))


@app.command()
def recipes() -> None:
    """List the named recipes shipped with pitlm."""
    from pitlm.config import load_recipe, recipe_names

    for name in recipe_names():
        print(f"{name:<28} stage={load_recipe(name).get('stage', '?')}")


app.add_typer(runs_app, name="runs")


# Stage packages, in pipeline order. Each `pitlm/<package>/cli.py` defines `register(app, bench_app)` and adds
# its own subcommands (a typer group such as `pitlm corpus ...`, top-level commands such as `pitlm merge`, and
# `pitlm bench <name>` commands). Imports are cheap: stage CLIs import heavy libraries inside their commands.
STAGE_PACKAGES = ("world", "market", "corpus", "train", "eval", "report", "jobs", "demo")


def _register_stages() -> None:
    import importlib
    import importlib.util

    for pkg in STAGE_PACKAGES:
        name = f"pitlm.{pkg}.cli"
        if importlib.util.find_spec(f"pitlm.{pkg}") is None or importlib.util.find_spec(name) is None:
            continue  # stage not built yet
        importlib.import_module(name).register(app, bench_app)
    if bench_app.registered_commands:
        app.add_typer(bench_app, name="bench")


_register_stages()


def main() -> None:
    try:
        app()
    except PitlmError as e:
        print(f"error: {e}", file=sys.stderr)
        _leave(e.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        _leave(130)
    except SystemExit as e:  # typer ends every command this way
        _leave(e.code)
    _leave(0)


def _leave(code) -> None:
    """Exit with `code`. A torchrun worker that used torch.distributed skips interpreter finalization: every file is
    written and the process group destroyed by now, but gloo's worker threads may still hold tensors whose
    destructors take the GIL while the interpreter is torn down, which aborts the rank (SIGABRT, "terminate called
    without an active exception") after a successful run and fails the whole torchrun job."""
    if "TORCHELASTIC_RUN_ID" in os.environ and "torch.distributed" in sys.modules:
        import logging

        if code is None:
            code = 0
        elif not isinstance(code, int):  # sys.exit("message"): printed, status 1
            print(code, file=sys.stderr)
            code = 1
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
