"""`pitlm eval`: sample rows -> prompts -> embeddings (cached) -> X = [embedding || numeric] -> protocols.

Every model, and always the knowledge-free control, is scored on the same rows with the same bootstrap draws
(DESIGN.md §4); `pitlm.eval.protocols.run.evaluate_features` does the statistics and this module does the plumbing and the
record (`runs/<id>/results.json`, see pitlm/eval/record.py). What would stop the statistics (too few stocks,
a fold layout the sampled dates cannot fill) is checked on the rows before any embedding is computed
(`check_rows`); the statistics show a progress bar per model and fold layout.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from datetime import date
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from pitlm.config import StageConfig, build_config
from pitlm.errors import PitlmError
from pitlm.eval.embed import EmbedOptions, embed
from pitlm.eval.family import WALK_FORWARD, family_report, family_summary_lines, known_shares, parse_families
from pitlm.eval.models import describe, parse_named_specs, parse_spec
from pitlm.eval.prompts import build_prompts, prompts_hash
from pitlm.eval.protocols import PROTOCOLS, get
from pitlm.eval.protocols.run import Panel, ProtocolConfig, build_layouts, evaluate_features
from pitlm.eval.record import eval_results, summary_from_lines
from pitlm.market.features import FEATURES, add_features, sample_rows
from pitlm.market.panel import load_panel

log = logging.getLogger("pitlm.eval")


class EvalConfig(StageConfig):
    market: str = Field(..., description="Market panel name on the volume (market/<name>/panel.parquet).")
    models: list[str] = Field(default_factory=list, description="NAME=SPEC entries (see pitlm/eval/models.py).")
    family: list[str] = Field(default_factory=list, description="NAME=model:RUN (a chronological run's members) or "
                              "NAME=SPEC@YYYY-MM-DD,... entries: families of PIT models, each member scored as a "
                              "model NAME-YYYY-MM-DD; the knowledge matrix and slopes go to results.json "
                              "(pitlm/eval/family.py).")
    family_ground_truth: str = Field("auto", description="Where the families' ground truth comes from: auto (the "
                                     "market's synthetic world, when the panel was built by `pitlm market world`), "
                                     "none, or a world name on the volume.")
    base: str | None = Field(None, description="NAME of the base model: premium_reduction = premium(base) - "
                             "premium(arm).")
    control: str = Field("control:random-features", description="The knowledge-free control's SPEC.")
    control_name: str = "control"
    control_match: Literal["spectrum", "dim+scale", "dim", "none"] = Field(
        "spectrum", description="Match the random-features control to the primary model's embedding: its "
        "dimension (unless the spec sets dim=), then `spectrum`: its singular values (the control keeps its own "
        "directions), `dim+scale`: its total variance. Ridge with a fixed alpha overfits by the design's spectrum; "
        "an unmatched control makes any model look 'net positive' (see `pitlm calibrate --set "
        "control_design=matched`).")
    protocols: list[str] = Field(default_factory=lambda: list(PROTOCOLS))
    max_stocks: int = Field(1000, ge=1)
    dates_per_stock: int = Field(30, ge=1)
    seed: int = 0
    template: str = Field("seed", description="Prompt template: seed | named | anonymised | a format string.")
    numeric_features: bool = Field(True, description="X = [embedding || log_close, log_volume, ret_5d, ret_30d, "
                                   "vol_20d] as in the seed.")
    batch_size: int = Field(32, ge=1)
    device: str = "auto"
    max_length: int = Field(256, ge=8)
    padding_side: Literal["right", "left"] = "right"
    reembed: bool = Field(False, description="Ignore cached embeddings (and overwrite them).")
    protocol: dict[str, Any] = Field(default_factory=dict, description="Options of pitlm.eval.protocols."
                                     "ProtocolConfig (n_boot, alpha, alpha_cv, windows, embargo, ...), over "
                                     "EVAL_PROTOCOL_DEFAULTS.")


def load_rows(vol, cfg: EvalConfig) -> pd.DataFrame:
    """The seeded eval sample of the market panel (features added, rows sorted by stock then date)."""
    panel = load_panel(vol, cfg.market)
    rows = sample_rows(add_features(panel), cfg.max_stocks, cfg.dates_per_stock, cfg.seed)
    log.info("sampled %d rows: %d stocks x <= %d dates, %s .. %s", len(rows), rows["SecuritiesCode"].nunique(),
             cfg.dates_per_stock, rows["Date"].min().date(), rows["Date"].max().date())
    return rows


def design_matrix(embedding: np.ndarray, rows: pd.DataFrame, numeric: bool = True) -> np.ndarray:
    """X = [embedding || numeric features] in float64 (DESIGN.md §4)."""
    parts = [np.asarray(embedding, dtype=np.float64)]
    if numeric:
        parts.append(rows[FEATURES].to_numpy(dtype=np.float64))
    return np.hstack(parts)


# alpha by inner CV is on by default for the calibrated protocols (legacy keeps the seed's alpha=1): with a fixed
# alpha, net-of-control compares how much each feature map overfits, and in the demo a knowledge-free PIT model came
# out "flagged" (net purged R2 0.29, CI [0.18, 1.2]) against a random-features control. Merged under the user's
# `protocol.*` options key by key (as calibrate does with its PROTOCOL_DEFAULTS), so `--n-boot` keeps it.
EVAL_PROTOCOL_DEFAULTS: dict[str, Any] = {"alpha_cv": True}


def protocol_config(protocols: list[str], options: dict[str, Any], seed: int):
    """pitlm.eval.protocols.run.ProtocolConfig from the stage's `protocols`, `seed` and `protocol.*` options."""
    # --set parses 2021-01-01 as a YAML date; the protocol windows are ISO strings.
    options = {k: v.isoformat() if isinstance(v, date) else v for k, v in options.items()}
    return build_config(ProtocolConfig, {"protocols": list(protocols), "seed": seed, **options})


def resolve_models(cfg: EvalConfig, vol):
    """{name: ModelSpec} with the control first; checks names and the base."""
    if not cfg.models and not cfg.family:
        raise PitlmError("give at least one model: --model NAME=SPEC or --family NAME=... (the control is added by "
                         "itself)")
    specs = parse_named_specs([*cfg.models, *family_models(cfg, vol)], vol, seed=cfg.seed)
    if cfg.control_name in specs:
        raise PitlmError(f"model name '{cfg.control_name}' is reserved for the control; pick another name")
    if cfg.base is not None and cfg.base not in specs:
        raise PitlmError(f"--base {cfg.base} is not one of the models ({', '.join(specs)})")
    control = parse_spec(cfg.control, vol, seed=cfg.seed)
    if not control.is_control:
        raise PitlmError(f"--control must be a control:... spec (knowledge-free), got '{cfg.control}'")
    return {cfg.control_name: control, **specs}


def family_models(cfg: EvalConfig, vol) -> list[str]:
    """The families' members as NAME=SPEC entries (checked: one-line errors before any work)."""
    if cfg.family and WALK_FORWARD.name not in cfg.protocols:
        raise PitlmError(f"--family needs the {WALK_FORWARD.name} protocol (the knowledge matrix is its per-year R2); "
                         "add it to --protocol")
    return [f"{m}={spec}" for members in parse_families(cfg.family, vol).values() for m, (spec, _) in members.items()]


def family_world(cfg: EvalConfig, vol):
    """The synthetic world that gives the families' ground truth, or None (a real market, or `none`)."""
    if cfg.family_ground_truth == "none":
        return None
    if cfg.family_ground_truth != "auto":
        world = vol.entry("world", cfg.family_ground_truth)
        if not (world / "ground_truth.parquet").is_file():
            raise PitlmError(f"family_ground_truth={cfg.family_ground_truth}: {world} is not a built world")
        return world
    try:
        manifest = json.loads(vol.path("market", cfg.market, "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    name = (manifest.get("config") or {}).get("world") if isinstance(manifest, dict) else None
    world = vol.path("world", name) if isinstance(name, str) and name else None
    return world if world is not None and (world / "ground_truth.parquet").is_file() else None


def family_reports(cfg: EvalConfig, vol, result) -> tuple[dict[str, dict], list[str]]:
    """Each family's report (knowledge matrix, slopes, with ground truth the staircase) and its summary lines."""
    families = parse_families(cfg.family, vol)
    world = family_world(cfg, vol) if families else None
    reports, lines = {}, []
    for name, members in families.items():
        cutoffs = {m: c for m, (_, c) in members.items()}
        known = {m: known_shares(world, c) for m, c in cutoffs.items()} if world is not None else None
        report = {"name": name, "ground_truth_world": str(world) if world is not None else None,
                  **family_report(result, cutoffs, known_years_of=known)}
        reports[name] = report
        lines += family_summary_lines(report, prefix=f"{name}." if len(families) > 1 else "")
    return reports, lines


def matched_control(spec, reference: np.ndarray, match: str):
    """The random-features control with the reference embedding's dimension (unless its spec sets dim=)."""
    if spec.kind != "random-features" or match == "none" or "dim=" in spec.raw:
        return spec
    return replace(spec, options={**spec.options, "dim": int(reference.shape[1])})


def match_control(X: np.ndarray, reference: np.ndarray, mode: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Give a random-features control the reference embedding's capacity under Ridge.

    `dim+scale`: rescale so the total variance (trace of the covariance) equals the reference's.
    `spectrum`: keep the control's centred singular vectors (what it encodes of the prompt) and give it the
    reference's singular values. Ridge's fit, its effective degrees of freedom sum(s^2 / (s^2 + alpha)) and hence
    its overfitting depend on the design through this spectrum, so a knowledge-free control with the model's
    spectrum is the model's capacity without its knowledge."""
    if mode not in ("spectrum", "dim+scale"):
        return X, {"control_match": mode}
    X = np.asarray(X, dtype=np.float64)
    R = np.asarray(reference, dtype=np.float64)
    if mode == "dim+scale":
        ref_var, var = float(R.var(axis=0).sum()), float(X.var(axis=0).sum())
        scale = float(np.sqrt(ref_var / var)) if ref_var > 0 and var > 0 else 1.0
        return (X * scale).astype(np.float32), {"control_match": mode, "control_scale": scale}
    mean = X.mean(axis=0)
    U, s, Vt = np.linalg.svd(X - mean, full_matrices=False)
    s_ref = np.linalg.svd(R - R.mean(axis=0), compute_uv=False)
    k = min(len(s), len(s_ref))
    out = mean + (U[:, :k] * s_ref[:k]) @ Vt[:k]
    return out.astype(np.float32), {"control_match": mode, "control_rank": int((s[:k] > s[0] * 1e-10).sum())}


def prepare_eval(cfg: EvalConfig, vol):
    """Check what can be checked before any work: model specs, the base, the protocol options."""
    return resolve_models(cfg, vol), protocol_config(cfg.protocols, {**EVAL_PROTOCOL_DEFAULTS, **cfg.protocol},
                                                     cfg.seed)


def check_rows(rows: pd.DataFrame, pcfg) -> None:
    """What would stop the statistics, checked on the sampled rows before any embedding is computed: too few
    stocks for the folds, a legacy chronological split with a side the rows' dates miss, a walk-forward with
    no test year, a purged grid that cannot be built (each one PitlmError line)."""
    panel = Panel(rows[["Date", "SecuritiesCode", "Target"]], pcfg)
    for protocol in pcfg.protocols:
        build_layouts(get(protocol), panel.calendar, pcfg)


def embed_models(cfg: EvalConfig, specs: dict, prompts: list[str], vol,
                 keys: pd.DataFrame | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Embeddings of every model (cached) and their records for results.json. The control is embedded last,
    matched to the primary model (the first that is neither the control nor the base) per `control_match`.
    `keys` (the rows' SecuritiesCode, Date) serve `embeddings:PATH` models, read first: a file that lacks a
    row fails before any language model runs."""
    opts = EmbedOptions(batch_size=cfg.batch_size, device=cfg.device, max_length=cfg.max_length,
                        padding_side=cfg.padding_side, reembed=cfg.reembed)
    primary = next((n for n in specs if n not in (cfg.control_name, cfg.base)), cfg.base)
    arrays, records = {}, {}
    models = sorted((n for n in specs if n != cfg.control_name), key=lambda n: specs[n].kind != "embeddings")
    for name in models + [cfg.control_name]:
        spec = specs[name]
        if name == cfg.control_name:
            spec = matched_control(spec, arrays[primary], cfg.control_match)
        emb = embed(spec, prompts, vol, opts, keys)
        arrays[name] = emb.X
        records[name] = {**describe(spec), "fingerprint": emb.fingerprint, "embedding_key": emb.key,
                         "embedding_dim": int(emb.X.shape[1]), "cached": emb.cached,
                         "embed_seconds": round(emb.seconds, 3),
                         **{k: emb.info[k] for k in ("device", "dtype", "prompts_per_s") if k in emb.info}}
    if specs[cfg.control_name].kind == "random-features":
        arrays[cfg.control_name], info = match_control(arrays[cfg.control_name], arrays[primary], cfg.control_match)
        records[cfg.control_name].update(info)
    return {n: arrays[n] for n in specs}, {n: records[n] for n in specs}


def run_eval(cfg: EvalConfig, vol, run, prepared=None) -> dict[str, Any]:
    """The whole stage; writes results.json in the run dir and prints the summary lines."""
    t0 = time.time()
    specs, pcfg = prepared or prepare_eval(cfg, vol)
    rows = load_rows(vol, cfg)
    check_rows(rows, pcfg)
    prompts = build_prompts(rows, cfg.template)
    log.info("prompt 0: %s", prompts[0])
    embeddings, models = embed_models(cfg, specs, prompts, vol, rows[["SecuritiesCode", "Date"]])
    features = {name: design_matrix(X, rows, cfg.numeric_features) for name, X in embeddings.items()}
    for name, X in features.items():
        models[name]["n_features"] = int(X.shape[1])
    t_stats = time.time()
    result = evaluate_features(features, rows[["Date", "SecuritiesCode", "Target"]], pcfg, control=cfg.control_name,
                      base=cfg.base, show_progress=True)
    lines = list(result.summary_lines())
    families, family_lines = family_reports(cfg, vol, result)
    lines += family_lines
    results = eval_results(cfg, pcfg, rows, models, result.to_json(), lines, prompts_hash(prompts),
                           timings={"embed_seconds": round(t_stats - t0, 3),
                                    "stats_seconds": round(time.time() - t_stats, 3)})
    if families:
        results["family"] = families
    path = run.save_json("results.json", results)
    run.finish({**summary_from_lines(lines), "rows": len(rows), "models": len(specs), "results_json": str(path)},
               print_lines=False)
    for line in lines:
        print(line)
    print(f"rows: {len(rows)}\nresults_json: {path}")
    return results
