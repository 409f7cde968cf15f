"""`pitlm market jpx|csv|world NAME`: load prices into the normalised panel PITLM_HOME/market/NAME/."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from pitlm.cliutil import guarded_volume

market_app = typer.Typer(help="Market data: Kaggle JPX, generic long-format CSV, or a synthetic world, each into "
                         "one normalised panel (market/<NAME>/panel.parquet + manifest.json).", no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(help="Panel name: written to PITLM_HOME/market/NAME/.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing panel of that name.")]
SectorOpt = Annotated[str, typer.Option("--sector", help="Sector column of stock_list.csv: 17SectorName | 33SectorName.")]
AdjustOpt = Annotated[str, typer.Option("--adjustment", help="AdjustmentFactor placement: auto | kaggle | ex-date "
                      "(see pitlm/market/jpx.py).")]
TolOpt = Annotated[float, typer.Option("--target-tolerance", help="Absolute difference above which a recomputed "
                   "Target disagrees with the file's.")]
OnInvalidOpt = Annotated[str, typer.Option("--on-invalid", help="Invalid rows (non-positive or non-finite price, "
                         "unparseable date, missing code, negative volume, duplicate (date, code), ...): error = refuse "
                         "the input naming the first one; drop = drop them, print dropped_<kind>: N and record each "
                         "kind's count and first rows in the manifest (see pitlm/market/rows.py).")]


@contextlib.contextmanager
def _writing(ctx: typer.Context, name: str, overwrite: bool) -> Iterator:
    """The guarded volume, holding the panel's write lock for the whole stage (a concurrent run of the same NAME
    fails with one line and touches nothing), refusing up front (before any slow loading) to replace an existing
    panel without --overwrite."""
    from pitlm.errors import PitlmError
    from pitlm.market.panel import panel_dir

    vol = guarded_volume(ctx, "market")
    final = panel_dir(vol, name)
    with vol.lock("market", name):
        if final.exists() and not overwrite:
            raise PitlmError(f"market panel '{name}' already exists at {final}; pass --overwrite to rebuild it")
        yield vol


def _save(vol, name: str, stage: str, panel, report: dict, inputs: dict, config: dict, overwrite: bool,
          t0: float) -> None:
    from pitlm.market.panel import panel_summary, save_panel
    from pitlm.runs import start_run

    with start_run(vol, "market", {"command": stage, "name": name, **config}) as run:
        path = save_panel(vol, name, panel, what=f"market:{stage}", inputs=inputs, config=config, report=report,
                          overwrite=overwrite, wall_seconds=round(time.time() - t0, 3))
        run.finish({"market": name, "source": stage, **panel_summary(panel), **report,
                    "panel": str(path / "panel.parquet")})


@market_app.command("jpx")
def jpx_command(
    ctx: typer.Context,
    name: NameArg,
    from_dir: Annotated[Path | None, typer.Option("--from", help="Directory with stock_list.csv and stock_prices.csv "
                        "(or train_files/stock_prices.csv).")] = None,
    download: Annotated[bool, typer.Option("--download", help="Download the competition files with the kaggle "
                        "package (KAGGLE_USERNAME/KAGGLE_KEY or ~/.kaggle/kaggle.json).")] = False,
    sector: SectorOpt = "17SectorName",
    adjustment: AdjustOpt = "auto",
    target_tolerance: TolOpt = 1e-6,
    on_invalid: OnInvalidOpt = "error",
    overwrite: OverwriteOpt = False,
) -> None:
    """Kaggle JPX (jpx-tokyo-stock-exchange-prediction): validate, split-adjust, recompute Target, join names."""
    from pitlm.errors import PitlmError
    from pitlm.market.jpx import download_jpx, load_jpx_dir
    from pitlm.market.rows import check_policy

    t0 = time.time()
    if download == (from_dir is not None):
        raise PitlmError("give exactly one of --download or --from DIR")
    check_policy(on_invalid)
    with _writing(ctx, name, overwrite) as vol:
        if download:
            with vol.lock("market", "_downloads"):  # one download into the shared staging directory at a time
                from_dir = download_jpx(vol.path("market", "_downloads", "jpx"))
        panel, report, inputs = load_jpx_dir(from_dir, sector=sector, adjustment=adjustment,
                                             target_tolerance=target_tolerance, on_invalid=on_invalid)
        _save(vol, name, "jpx", panel, report, inputs, {"sector": sector, "adjustment": adjustment,
              "target_tolerance": target_tolerance, "on_invalid": on_invalid}, overwrite, t0)


@market_app.command("csv")
def csv_command(
    ctx: typer.Context,
    name: NameArg,
    source: Annotated[Path, typer.Option("--from", help="Long-format prices: a CSV/parquet file or a directory of them.")],
    date_col: Annotated[str | None, typer.Option("--date-col", help="Date column (default: date/Date/...).")] = None,
    code_col: Annotated[str | None, typer.Option("--code-col", help="Security code or ticker column (default: code/ticker/symbol/...; a directory of one file per security needs none).")] = None,
    close_col: Annotated[str | None, typer.Option("--close-col", help="Close column (assumed split-adjusted).")] = None,
    volume_col: Annotated[str | None, typer.Option("--volume-col", help="Volume column (optional).")] = None,
    name_col: Annotated[str | None, typer.Option("--name-col", help="Company name column (optional).")] = None,
    adj_close_col: Annotated[str | None, typer.Option("--adj-close-col", help="Adjusted close column; used instead of close.")] = None,
    date_format: Annotated[str | None, typer.Option("--date-format", help="strftime format of every file's dates, "
                           "e.g. %m/%d/%Y (default: guessed per file from its own dates).")] = None,
    on_invalid: OnInvalidOpt = "error",
    overwrite: OverwriteOpt = False,
) -> None:
    """Generic daily prices of any market; Target with the JPX definition (close t+1 -> t+2)."""
    from pitlm.market.generic import generic_panel, read_long_prices
    from pitlm.market.rows import check_policy

    t0 = time.time()
    check_policy(on_invalid)
    given = {"date": date_col, "code": code_col, "close": close_col, "volume": volume_col, "name": name_col,
             "adj_close": adj_close_col}
    with _writing(ctx, name, overwrite) as vol:
        raw, report = read_long_prices(source, given)
        panel, more = generic_panel(raw, str(source), on_invalid=on_invalid, date_format=date_format)
        config = {**{k: v for k, v in given.items() if v}, "date_format": date_format, "on_invalid": on_invalid}
        _save(vol, name, "csv", panel, {**report, **more}, {"source": str(source)}, config, overwrite, t0)


@market_app.command("world")
def world_command(
    ctx: typer.Context,
    name: NameArg,
    world: Annotated[str | None, typer.Option("--world", help="World name under PITLM_HOME/world/ (default: NAME).")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """A synthetic world's prices (built by `pitlm world build`), through the JPX loader."""
    from pitlm.errors import PitlmError
    from pitlm.market.jpx import load_jpx_dir

    t0 = time.time()
    world = world or name
    with _writing(ctx, name, overwrite) as vol:
        wdir = vol.entry("world", world)
        if not wdir.is_dir():
            raise PitlmError(f"no world '{world}' at {wdir}; build it with `pitlm world build {world}`")
        panel, report, inputs = load_jpx_dir(wdir)
        _save(vol, name, "world", panel, report, {**inputs, "world": world}, {"world": world}, overwrite, t0)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.add_typer(market_app, name="market")
