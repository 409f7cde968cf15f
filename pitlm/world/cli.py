"""`pitlm world build NAME`: generate a synthetic world onto the volume (PITLM_HOME/world/NAME/)."""

from __future__ import annotations

from typing import Annotated

import typer

from pitlm.cliutil import RecipeOpt, SetOpt, guarded_volume

world_app = typer.Typer(help="Synthetic worlds: JPX-format prices with planted leakage and a dated FineWeb-format "
                        "corpus whose news reveals each period's moves after the fact.", no_args_is_help=True)


@world_app.command("build")
def build_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="World name: written to PITLM_HOME/world/NAME/.")],
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of everything (default 0).")] = None,
    leak_strength: Annotated[float | None, typer.Option("--leak-strength", help="Planted component scale; 0 = null world (default 1).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing world of that name.")] = False,
    recipe: RecipeOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Generate a world: stock_prices.csv, stock_list.csv (Kaggle JPX columns), corpus/<DUMP>.parquet (FineWeb
    schema), ground_truth.parquet, news_index.parquet and manifest.json. Deterministic from the seed."""
    from pitlm.config import load_config
    from pitlm.errors import PitlmError
    from pitlm.market.panel import check_name
    from pitlm.runs import start_run
    from pitlm.world.config import WorldConfig
    from pitlm.world.generate import build_world

    cfg = load_config(WorldConfig, recipe, overrides, seed=seed, leak_strength=leak_strength).check()
    vol = guarded_volume(ctx, "world")
    out = vol.path("world", check_name("world", name))
    # the lock spans check, generation and publish: a concurrent build of NAME fails in one line, touching nothing
    with vol.lock("world", name):
        if out.exists() and not overwrite:
            raise PitlmError(f"world '{name}' already exists at {out}; pass --overwrite to rebuild it")
        with start_run(vol, "world", cfg) as run:
            summary = build_world(cfg, out, overwrite=overwrite)
            run.finish({"world": name, "path": str(out), **summary})


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.add_typer(world_app, name="world")
