"""CLI of the eval stage: `pitlm eval`, `pitlm calibrate`, `pitlm probe`, `pitlm bench embed`, `pitlm bench stats`.

Thin: flags -> config -> the library function; torch/transformers are imported inside the commands.
"""

from __future__ import annotations

from typing import Annotated

import typer

from pitlm.cliutil import RecipeOpt, SetOpt, guarded_volume
from pitlm.eval.protocols import PROTOCOLS

ModelOpt = Annotated[list[str] | None, typer.Option("--model", "-m", help="NAME=SPEC (repeatable). SPEC: HF id or dir, "
                     "model:<run>, adapter:PATH[@BASE], control:random-features, control:random-init:<arch>, "
                     "embeddings:PATH (.parquet or .npy + keys, by SecuritiesCode and Date).")]
ProtocolOpt = Annotated[str | None, typer.Option("--protocol", "-p", help=f"Comma-separated: {','.join(PROTOCOLS)}.")]


def _protocols(text: str | None) -> list[str] | None:
    return None if text is None else [p.strip() for p in text.split(",") if p.strip()]


def eval_command(
    ctx: typer.Context,
    market: Annotated[str | None, typer.Option("--market", help="Market panel name on the volume (market/<name>/).")] = None,
    model: ModelOpt = None,
    family: Annotated[list[str] | None, typer.Option("--family", help="NAME=model:<run> (a chronological run's "
                      "members) or NAME=SPEC@YYYY-MM-DD,... (e.g. hf:ORG/ID@2019-12-31): a family of PIT models, "
                      "scored into a knowledge matrix (repeatable).")] = None,
    base: Annotated[str | None, typer.Option("--base", help="NAME of the base model (for premium_reduction).")] = None,
    control: Annotated[str | None, typer.Option("--control", help="Knowledge-free control SPEC (always scored).")] = None,
    protocol: ProtocolOpt = None,
    max_stocks: Annotated[int | None, typer.Option("--max-stocks", help="Top stocks by row count (seed: 1000).")] = None,
    dates_per_stock: Annotated[int | None, typer.Option("--dates-per-stock", help="Random dates per stock (seed: 30).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Sampling and bootstrap seed.")] = None,
    template: Annotated[str | None, typer.Option("--template", help="seed | named | anonymised | a format string.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Prompts per forward pass.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda[:i].")] = None,
    n_boot: Annotated[int | None, typer.Option("--n-boot", help="Bootstrap draws (default 200).")] = None,
    recipe: RecipeOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Measure look-ahead leakage: embed the sampled (stock, date) prompts with every model, then score the
    protocols on the same rows, net of the knowledge-free control, with a paired stock-clustered bootstrap."""
    from pitlm.config import load_config
    from pitlm.eval.pipeline import EvalConfig, prepare_eval, run_eval
    from pitlm.runs import start_run

    sets = list(overrides or [])
    if n_boot is not None:
        sets.append(f"protocol.n_boot={n_boot}")
    cfg = load_config(EvalConfig, recipe, sets, market=market, models=model or None,
                      family=family or None, base=base, control=control,
                      protocols=_protocols(protocol), max_stocks=max_stocks, dates_per_stock=dates_per_stock,
                      seed=seed, template=template, batch_size=batch_size, device=device)
    vol = guarded_volume(ctx, "eval")
    prepared = prepare_eval(cfg, vol)
    with start_run(vol, "eval", cfg) as run:
        run_eval(cfg, vol, run, prepared)


def calibrate_command(
    ctx: typer.Context,
    worlds: Annotated[int | None, typer.Option("--worlds", "-k", help="Null and planted worlds each (default 20).")] = None,
    protocol: ProtocolOpt = None,
    leak_strength: Annotated[float | None, typer.Option("--leak-strength", help="Planted worlds' strength (default: the world default).")] = None,
    family: Annotated[bool | None, typer.Option("--family", help="Calibrate the knowledge matrix's per-cell test (a family of staircase oracles, walk-forward) instead of the protocols.")] = None,
    probe: Annotated[str | None, typer.Option("--probe", help="Comma-separated mink,entity,lap: calibrate these knowledge probes' tests (simulated LM scores, pitlm/eval/probecal.py) instead of the protocols.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="First world seed (worlds use seed..seed+K-1).")] = None,
    n_boot: Annotated[int | None, typer.Option("--n-boot", help="Bootstrap draws per world (default 200).")] = None,
    recipe: RecipeOpt = None,
    overrides: SetOpt = None,
) -> None:
    """False-positive rate and power of each protocol (or, with --family / --probe, of the knowledge matrix's
    cells / the knowledge probes) over seeded synthetic worlds (null and planted)."""
    from pitlm.config import load_config
    from pitlm.eval.calibrate import CalibrateConfig, run_calibrate
    from pitlm.runs import start_run

    sets = list(overrides or [])
    if n_boot is not None:
        sets.append(f"protocol.n_boot={n_boot}")
    cfg = load_config(CalibrateConfig, recipe, sets, worlds=worlds, protocols=_protocols(protocol),
                      leak_strength=leak_strength, seed=seed, family=family, probes=_protocols(probe))
    vol = guarded_volume(ctx, "calibrate")
    with start_run(vol, "calibrate", cfg) as run:
        run_calibrate(cfg, run)


def probe_command(
    ctx: typer.Context,
    market: Annotated[str | None, typer.Option("--market", help="Market panel name on the volume (market/<name>/).")] = None,
    model: ModelOpt = None,
    probe: Annotated[str | None, typer.Option("--probe", help="Comma-separated: mink,entity,lap (default all).")] = None,
    control: Annotated[str | None, typer.Option("--control", help="The LM probes' control SPEC (default: "
                       "control:random-init:<each model's dir>, its untrained twin).")] = None,
    move: Annotated[str | None, typer.Option("--move", help="target (the row's Target) | planted (a synthetic "
                    "world's planted move).")] = None,
    template: Annotated[str | None, typer.Option("--template", help="Statement prefix / named prompt (default bare).")] = None,
    max_stocks: Annotated[int | None, typer.Option("--max-stocks", help="Top stocks by row count.")] = None,
    dates_per_stock: Annotated[int | None, typer.Option("--dates-per-stock", help="Random dates per stock.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Sampling and bootstrap seed.")] = None,
    n_boot: Annotated[int | None, typer.Option("--n-boot", help="Bootstrap draws (default 200).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda[:i].")] = None,
    recipe: RecipeOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Knowledge probes per (stock, date) row: Min-K% / Min-K%++ of the realised move's statement and the
    direction accuracy (mink), named vs anonymised leakage (entity), the look-ahead-propensity interaction (lap),
    net of a knowledge-free control, on the eval's paired stock-clustered draws."""
    from pitlm.config import load_config
    from pitlm.eval.probe import ProbeConfig, run_probe
    from pitlm.runs import start_run

    sets = list(overrides or [])
    if n_boot is not None:
        sets.append(f"protocol.n_boot={n_boot}")
    cfg = load_config(ProbeConfig, recipe, sets, market=market, models=model or None, probes=_protocols(probe),
                      control=control, move=move, template=template, max_stocks=max_stocks,
                      dates_per_stock=dates_per_stock, seed=seed, device=device)
    vol = guarded_volume(ctx, "probe")
    with start_run(vol, "probe", cfg) as run:
        run_probe(cfg, vol, run)


def bench_embed_command(
    arch: Annotated[str, typer.Option("--arch", help="tiny-qwen3 | tiny-qwen3_5_moe | qwen3.5-35b-a3b | HF id/dir (random weights).")] = "tiny-qwen3",
    n_prompts: Annotated[int, typer.Option("--n-prompts", help="Prompts to embed.")] = 256,
    batch: Annotated[str, typer.Option("--batch", help="Prompts per forward pass; a comma list times each on one model.")] = "32",
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="Tokens per prompt.")] = 64,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda[:i].")] = "auto",
    fast_kernels: Annotated[bool, typer.Option("--fast-kernels/--no-fast-kernels", help="GPU: fla's fused causal conv1d and RMSNorms (pitlm.kernels).")] = True,
    profile: Annotated[str | None, typer.Option("--profile", help="Write a torch.profiler table of one more batch to this file.")] = None,
    routed_kernels: Annotated[bool, typer.Option("--routed-kernels/--no-routed-kernels", help="GPU, with the fast kernels: the routed experts' fused Triton kernels (pitlm.kernels.routed).")] = True,
) -> None:
    """Forward-only embedding throughput (prompts/s) of a random-weight architecture, as `pitlm eval` runs it."""
    from pitlm.eval.embed import bench_embed
    from pitlm.log import emit_summary

    batches = tuple(int(b) for b in batch.split(",") if b.strip())
    out = bench_embed(arch, n_prompts=n_prompts, batch_sizes=batches, device=device, prompt_tokens=prompt_tokens,
                      fast_kernels=fast_kernels, profile_path=profile, routed_kernels=routed_kernels)
    emit_summary(out)


def bench_stats_command(
    scale: Annotated[str, typer.Option(help="Preset: demo-small (30x30x133), demo (100x30x256), us-473 "
                                            "(473x30x133), seed (1000x30x2053).")] = "demo",
    stocks: Annotated[int | None, typer.Option(help="Override the preset's number of stocks.")] = None,
    dates_per_stock: Annotated[int | None, typer.Option(help="Override the preset's dates per stock.")] = None,
    features: Annotated[int | None, typer.Option(help="Override the preset's number of features.")] = None,
    draws: Annotated[int, typer.Option(help="Bootstrap draws for the engine.")] = 200,
    sklearn_draws: Annotated[int, typer.Option(help="Draws for scikit-learn (its time per draw is extrapolated).")] = 10,
    protocol: Annotated[str, typer.Option(help="legacy (chronological + GroupKFold), purged, walk_forward, or eval "
                                               "(all three with the eval's defaults: alpha by inner CV, jackknife, "
                                               "rank IC; engine only).")] = "legacy",
    designs: Annotated[int, typer.Option(help="Designs scored on the same draws (a control + N-1 models).")] = 1,
    device: Annotated[str, typer.Option(help="cpu or cuda (float64 torch).")] = "cpu",
    engine: Annotated[str, typer.Option(help="Engine mode: auto, stats (per-stock statistics) or rows.")] = "auto",
    seed: Annotated[int, typer.Option(help="Data and bootstrap seed.")] = 0,
    save_values: Annotated[str | None, typer.Option(help="Write every statistic of every draw to this .npz.")] = None,
    compare_values: Annotated[str | None, typer.Option(help="Compare every statistic with this saved .npz.")] = None,
) -> None:
    """Time the exact statistics engine (against scikit-learn where it has the protocol); print the figures."""
    from pitlm.eval.bench import StatsBench, run_bench_stats
    from pitlm.log import emit_summary

    emit_summary(run_bench_stats(StatsBench(scale, stocks, dates_per_stock, features, draws, sklearn_draws, protocol,
                                            designs, device, engine, seed, save_values, compare_values)))


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("calibrate")(calibrate_command)
    app.command("probe")(probe_command)
    bench_app.command("embed")(bench_embed_command)
    bench_app.command("stats")(bench_stats_command)
