"""`pitlm probe`: knowledge probes per (stock, date) row, beside the regression verdict, with paired CIs.

The rows are the eval's seeded sample of the market (`--market`, `--max-stocks`, `--dates-per-stock`, `--seed`); the
row's realised move is its `Target` (`move=target`, what the eval forecasts) or, on a synthetic world's market, the
planted move of its period (`move=planted`, the world's ground truth; rows without one are left out). Probes:

- `mink`: the prompt "On <date>, <name> (code <code>) shares had" (the `bare` template) completed with the realised
  move (" risen" / " fallen") and with the opposite one; per statement Min-K% Prob and Min-K%++ (k = 20%) from one
  forward pass (pitlm/eval/probestats.py). `mink` and `minkpp` = the realised statement's score minus the opposite
  one's, up and down rows weighted equally; `direction_accuracy` = balanced share of rows where logsumexp of the
  next-token log-probs over up-words minus down-words (after the bare prompt) has the move's sign
  (scripts/probe_direction.py's probe).
- `entity`: the eval's leakage statistic (net of its random-features control, default net_r2_purged) with the
  named template and with its anonymised twin ("On <date>, the company shares had") on the same rows and draws:
  `entity_gap` = named - anonymised, per draw. `entity_named` is the regression verdict of `pitlm eval` with the
  named template.
- `lap`: a look-ahead-propensity test (Gao, Jiang & Yan): y = the move, f = the direction margin (the LM's own
  zero-shot forecast), l = Min-K% of the prompt itself (how familiar the prompt is); `lap_interaction` = the
  coefficient of f*l in y ~ 1 + f + l + f*l, all standardised.

Every LM statistic is also reported net of a knowledge-free control of the same architecture and tokenizer, by
default `control:random-init:<the model's own dir>` (random weights; random-features has no likelihood), per draw.
All draws are the eval's stock-clustered count vectors of the same rows and seed (pitlm.eval.protocols.run.
count_vectors), so probe statistics are paired with each other and with the regression. A probe is *flagged* when
the 95% interval of its net statistic lies above 0. How often that happens in null and planted worlds: `pitlm
calibrate --probe mink,entity,lap` (pitlm/eval/probecal.py, which says what it does and does not calibrate).
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from scipy.special import logsumexp

from pitlm.config import StageConfig
from pitlm.errors import PitlmError
from pitlm.eval.bootstrap import summarize
from pitlm.eval.embed import pad_batch, pad_id_of, tokenize
from pitlm.eval.models import (
    default_dtype,
    describe,
    load_causal_lm,
    load_tokenizer,
    parse_named_specs,
    parse_spec,
    resolve_device,
)
from pitlm.eval.pipeline import (
    EVAL_PROTOCOL_DEFAULTS,
    EvalConfig,
    check_rows,
    design_matrix,
    embed_models,
    family_world,
    load_rows,
    protocol_config,
    resolve_models,
)
from pitlm.eval.probestats import balanced_accuracy, lap_interaction, min_k, min_k_pp, row_weights, true_minus_false
from pitlm.eval.prompts import build_prompts
from pitlm.eval.protocols.run import Panel, count_vectors, evaluate_features
from pitlm.eval.record import rows_summary, summary_from_lines
from pitlm.eval.result import _finite
from pitlm.log import format_value, make_progress
from pitlm.volume import package_versions

log = logging.getLogger("pitlm.eval")
PROBES = ("mink", "entity", "lap")
LM_STATS = {"mink": ("mink", "minkpp", "direction_accuracy"), "lap": ("lap_interaction",)}
ANONYMISED = {"bare": "bare-anonymised", "named": "anonymised"}
UP_WORDS = [" risen", " rallied", " advanced", " climbed", " gained"]
DOWN_WORDS = [" fallen", " dropped", " declined", " slid", " slumped"]


class ProbeConfig(StageConfig):
    market: str = Field(..., description="Market panel name on the volume (market/<name>/panel.parquet).")
    models: list[str] = Field(default_factory=list, description="NAME=SPEC entries (any eval model spec; mink and "
                              "lap need a language model).")
    probes: list[Literal["mink", "entity", "lap"]] = ["mink", "entity", "lap"]
    control: str | None = Field(None, description="Knowledge-free control of the LM probes (one for every model); "
                                "default: control:random-init:<each model's own dir>, its untrained twin.")
    entity_control: str = Field("control:random-features", description="The entity probe's regression control.")
    control_match: Literal["spectrum", "dim+scale", "dim", "none"] = "spectrum"
    move: Literal["target", "planted"] = Field("target", description="target: the row's Target; planted: the "
                                               "synthetic world's planted move of the row's period.")
    template: str = Field("bare", description="The statements' prefix and the entity probe's named prompt.")
    anonymised_template: str | None = Field(None, description="The entity probe's anonymised prompt (default: "
                                            "the template's -anonymised twin).")
    up_words: list[str] = Field(default_factory=lambda: list(UP_WORDS), min_length=1,
                                description="Direction margin's up-words; the first completes the up statement.")
    down_words: list[str] = Field(default_factory=lambda: list(DOWN_WORDS), min_length=1)
    k: float = Field(0.2, gt=0, le=1, description="Min-K%: the share of lowest-scoring tokens averaged.")
    protocols: list[str] = Field(default_factory=lambda: ["purged"], description="The entity probe's protocols.")
    numeric_features: bool = False
    max_stocks: int = Field(1000, ge=1)
    dates_per_stock: int = Field(30, ge=1)
    seed: int = 0
    batch_size: int = Field(32, ge=1)
    device: str = "auto"
    max_length: int = Field(256, ge=8)
    protocol: dict[str, Any] = Field(default_factory=dict, description="ProtocolConfig options (n_boot, ...) over "
                                     "the eval's defaults; the probes use its draws.")


# ----------------------------------------------------------------------------- LM token scores

def token_scores(model, seqs: list[list[int]], batch_size: int, device: str, pad_id: int,
                 description: str) -> list[dict[str, np.ndarray]]:
    """Per sequence: lp (log p of tokens 1..L-1 given the tokens before), and mu, sd: the mean and standard
    deviation of log p(z) under the model's next-token distribution at the same positions (for Min-K%++)."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out: list[dict[str, np.ndarray]] = [{} for _ in seqs]
    with torch.inference_mode(), make_progress() as bar:
        task = bar.add_task(description, total=len(seqs), rate="")
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = pad_batch([seqs[i] for i in idx], pad_id, "right")
            ids, mask = ids.to(device), mask.to(device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logp = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.float()
            logp = logp[:, :-1].log_softmax(-1)
            p = logp.exp()
            mu = (p * logp).sum(-1)
            sd = ((p * logp.square()).sum(-1) - mu.square()).clamp(min=0).sqrt()
            lp = logp.gather(-1, ids[:, 1:, None])[..., 0]
            for j, i in enumerate(idx):
                n = len(seqs[i]) - 1
                out[i] = {"lp": lp[j, :n].cpu().numpy(), "mu": mu[j, :n].cpu().numpy(),
                          "sd": sd[j, :n].cpu().numpy()}
            bar.update(task, advance=len(idx))
    return out


def word_sequences(tok, prompts: list[str], words: list[str], max_length: int, name: str):
    """Token ids of every prompt and of prompt + word for each word (the prompt's tokens must be a prefix)."""
    prefix = tokenize(tok, prompts, max_length)
    if min(len(a) for a in prefix) < 2:
        raise PitlmError(f"'{name}': a prompt tokenizes to one token; Min-K% needs at least one scored token")
    out = []
    for w in words:
        seqs = tokenize(tok, [p + w for p in prompts], max_length)
        bad = next((i for i, (a, s) in enumerate(zip(prefix, seqs, strict=True))
                    if s[:len(a)] != a or len(s) <= len(a)), None)
        if bad is not None:
            raise PitlmError(f"'{name}': the tokens of {prompts[bad]!r} are not a prefix of those of "
                             f"{prompts[bad] + w!r} (a probe word must start a new token, e.g. with a leading space)")
        out.append(seqs)
    return prefix, out


def score_rows(spec, prompts: list[str], cfg: ProbeConfig) -> dict[str, np.ndarray]:
    """Per row with one LM: mink_up/down and minkpp_up/down of the two statements (prompt + the first up-/down-
    word), margin = logsumexp over up-words of log p(word | prompt) - the same over down-words (a word's log p
    sums its tokens'; with one-token words this is scripts/probe_direction.py's margin), and lap = Min-K% of
    the prompt's own tokens."""
    if not spec.needs_lm:
        raise PitlmError(f"'{spec.raw}' has no likelihood: the mink and lap probes need a language model "
                         f"(use --probe entity for embeddings and random features)")
    device = resolve_device(cfg.device)
    tok = load_tokenizer(spec)
    model = load_causal_lm(spec, device, default_dtype(device))
    words = [*cfg.up_words, *cfg.down_words]
    prefix, per_word = word_sequences(tok, prompts, words, cfg.max_length, spec.raw)
    n = len(prompts)
    flat = [s for seqs in per_word for s in seqs]
    scores = token_scores(model, flat, cfg.batch_size, device, pad_id_of(tok), f"probe {spec.raw}")
    del model
    by_word = [scores[i * n:(i + 1) * n] for i in range(len(words))]
    word_lp = np.array([[s["lp"][len(a) - 1:].sum() for s, a in zip(ws, prefix, strict=True)] for ws in by_word])
    n_up = len(cfg.up_words)
    up, down = by_word[0], by_word[n_up]
    return {"mink_up": np.array([min_k(s["lp"], cfg.k) for s in up]),
            "mink_down": np.array([min_k(s["lp"], cfg.k) for s in down]),
            "minkpp_up": np.array([min_k_pp(s["lp"], s["mu"], s["sd"], cfg.k) for s in up]),
            "minkpp_down": np.array([min_k_pp(s["lp"], s["mu"], s["sd"], cfg.k) for s in down]),
            "margin": logsumexp(word_lp[:n_up], axis=0) - logsumexp(word_lp[n_up:], axis=0),
            "lap": np.array([min_k(s["lp"][:len(a) - 1], cfg.k) for s, a in zip(up, prefix, strict=True)])}


# ----------------------------------------------------------------------------- statistics per draw

def lm_probe_values(scores: dict[str, np.ndarray], move: np.ndarray, W: np.ndarray,
                    probes: list[str]) -> dict[str, np.ndarray]:
    """(C,) arrays of the LM statistics (see probestats) from a model's per-row scores."""
    up = move > 0
    out = {}
    if "mink" in probes:
        out["mink"] = true_minus_false(W, scores["mink_up"] - scores["mink_down"], up)
        out["minkpp"] = true_minus_false(W, scores["minkpp_up"] - scores["minkpp_down"], up)
        out["direction_accuracy"] = balanced_accuracy(W, scores["margin"], up)
    if "lap" in probes:
        out["lap_interaction"] = lap_interaction(W, move, scores["margin"], scores["lap"])
    return out


def summarise_probe(values: np.ndarray, control: np.ndarray, n_boot: int, level: float) -> dict[str, Any]:
    """The raw statistic, its control's and the net (model - control, per draw) with intervals; the decision."""
    net = summarize(values - control, n_boot, level)
    return {"model": summarize(values, n_boot, level), "control": summarize(control, n_boot, level), "net": net,
            "flagged": bool(np.isfinite(net["ci_lo"]) and net["ci_lo"] > 0)}


def probe_lines(name: str, stat: str, s: dict[str, Any]) -> list[str]:
    lines = []
    for key, part in ((f"{name}_{stat}", s["model"]), (f"{name}_net_{stat}", s["net"])):
        lines += [f"{key}: {format_value(part['estimate'])}", f"{key}_ci_lo: {format_value(part['ci_lo'])}",
                  f"{key}_ci_hi: {format_value(part['ci_hi'])}"]
    return lines + [f"{name}_{stat}_flagged: {format_value(s['flagged'])}"]


# ----------------------------------------------------------------------------- the stage

def anonymised_template(cfg: ProbeConfig) -> str:
    if cfg.anonymised_template:
        return cfg.anonymised_template
    if cfg.template in ANONYMISED:
        return ANONYMISED[cfg.template]
    raise PitlmError(f"template '{cfg.template}' has no anonymised twin; give --set anonymised_template=... "
                     f"(e.g. one with {{entity}} in place of {{name}} and {{code}})")


def probe_moves(vol, cfg: ProbeConfig, rows: pd.DataFrame) -> np.ndarray:
    """The realised move of every row (NaN or 0: no move, left out of the LM probes)."""
    if cfg.move == "target":
        return rows["Target"].to_numpy(dtype=np.float64)
    world = family_world(SimpleNamespace(family_ground_truth="auto", market=cfg.market), vol)
    if world is None:
        raise PitlmError(f"move=planted needs a market built from a synthetic world (`pitlm market world`); "
                         f"'{cfg.market}' is not one: use move=target")
    gt = pd.read_parquet(world / "ground_truth.parquet", columns=["Date", "SecuritiesCode", "planted_target"])
    merged = rows[["Date", "SecuritiesCode"]].merge(gt, on=["Date", "SecuritiesCode"], how="left")
    return merged["planted_target"].to_numpy(dtype=np.float64)


def lm_controls(cfg: ProbeConfig, specs: dict, vol) -> dict[str, Any]:
    """Each model's knowledge-free LM control: cfg.control, or the random-init twin of its own architecture."""
    out = {}
    for name, spec in specs.items():
        if cfg.control:
            out[name] = parse_spec(cfg.control, vol, seed=cfg.seed)
        elif spec.kind == "random-init":
            out[name] = parse_spec(f"control:random-init:{spec.arch}", vol, seed=cfg.seed + 1)
        elif spec.kind in ("hf", "adapter"):
            out[name] = parse_spec(f"control:random-init:{(spec.base or spec).path}", vol, seed=cfg.seed)
        else:
            raise PitlmError(f"model '{name}' ({spec.raw}) has no likelihood: the mink and lap probes need a "
                             f"language model; run --probe entity for it")
        if not out[name].is_control:
            raise PitlmError(f"the LM probes' control must be a control:... spec, got '{out[name].raw}'")
    return out


def entity_probe(cfg: ProbeConfig, vol, rows: pd.DataFrame, pcfg) -> dict[str, dict]:
    """Per model: the net leakage statistic with the named and the anonymised prompt, and their gap per draw."""
    anon = anonymised_template(cfg)
    ecfg = EvalConfig(market=cfg.market, models=cfg.models, control=cfg.entity_control, control_match=cfg.control_match,
                      protocols=cfg.protocols, template=cfg.template, numeric_features=cfg.numeric_features,
                      batch_size=cfg.batch_size, device=cfg.device, max_length=cfg.max_length)
    specs = resolve_models(ecfg, vol)
    keys = rows[["SecuritiesCode", "Date"]]
    features = {}
    for tag, template in (("", cfg.template), ("@anonymised", anon)):
        arrays, _ = embed_models(ecfg, specs, build_prompts(rows, template), vol, keys)
        features.update({f"{n}{tag}": design_matrix(X, rows, cfg.numeric_features) for n, X in arrays.items()})
    result = evaluate_features(features, rows[["Date", "SecuritiesCode", "Target"]], pcfg, control="control", show_progress=True)
    stat = result.leakage_statistic()
    V = result.values
    out = {}
    for m in specs:
        if m == "control":
            continue
        named = V[m][stat] - V["control"][stat]
        anonymised = V[f"{m}@anonymised"][stat] - V["control@anonymised"][stat]
        out[m] = {"statistic": f"net_{stat}", "named": named, "anonymised": anonymised, "gap": named - anonymised}
    return out


def run_probe(cfg: ProbeConfig, vol, run) -> dict[str, Any]:
    """The whole stage: writes results.json (stage 'probe') in the run dir and prints the summary lines."""
    t0 = time.time()
    if not cfg.models:
        raise PitlmError("give at least one model: --model NAME=SPEC")
    specs = parse_named_specs(cfg.models, vol, seed=cfg.seed)
    lm = [p for p in cfg.probes if p in LM_STATS]
    controls = lm_controls(cfg, specs, vol) if lm else {}
    pcfg = protocol_config(cfg.protocols, {**EVAL_PROTOCOL_DEFAULTS, **cfg.protocol}, cfg.seed)
    if "entity" in cfg.probes:
        anonymised_template(cfg)
    rows = load_rows(vol, cfg)
    if "entity" in cfg.probes:
        check_rows(rows, pcfg)
    move = probe_moves(vol, cfg, rows)
    has_move = np.isfinite(move) & (move != 0)
    if not has_move.any():
        raise PitlmError(f"no sampled row has a move (move={cfg.move}); use move=target")
    panel = Panel(rows[["Date", "SecuritiesCode", "Target"]], pcfg)
    counts = count_vectors(panel.n_stocks, pcfg)
    W = row_weights(counts, panel.stock, has_move)
    level = pcfg.ci_level
    probes: dict[str, Any] = {}
    lines: list[str] = []
    if lm:
        prompts = build_prompts(rows, cfg.template)
        log.info("statement 0: %s%s / %s", prompts[0], cfg.up_words[0], cfg.down_words[0])
        cache: dict[str, dict[str, np.ndarray]] = {}
        mv = np.where(has_move, move, 0.0)
        for name, spec in specs.items():
            for s in (spec, controls[name]):
                if s.raw not in cache:
                    cache[s.raw] = score_rows(s, prompts, cfg)
            values = lm_probe_values(cache[spec.raw], mv, W, lm)
            ctl = lm_probe_values(cache[controls[name].raw], mv, W, lm)
            entry = {"spec": describe(spec), "control": describe(controls[name]), "stats": {}}
            for stat in values:
                entry["stats"][stat] = summarise_probe(values[stat], ctl[stat], pcfg.n_boot, level)
                lines += probe_lines(name, stat, entry["stats"][stat])
            probes.setdefault("lm", {})[name] = entry
    if "entity" in cfg.probes:
        ent = entity_probe(cfg, vol, rows, pcfg)
        probes["entity"] = {}
        for name, e in ent.items():
            s = {k: summarize(e[k], pcfg.n_boot, level) for k in ("named", "anonymised", "gap")}
            flag = {k: bool(np.isfinite(s[k]["ci_lo"]) and s[k]["ci_lo"] > 0) for k in s}
            probes["entity"][name] = {"statistic": e["statistic"], **s, "flagged": flag,
                                      "templates": [cfg.template, anonymised_template(cfg)]}
            for k in s:
                lines += [f"{name}_entity_{k}: {s[k]['estimate']:.6g}", f"{name}_entity_{k}_ci_lo: {s[k]['ci_lo']:.6g}",
                          f"{name}_entity_{k}_ci_hi: {s[k]['ci_hi']:.6g}"]
            lines += [f"{name}_regression_flagged: {str(flag['named']).lower()}",
                      f"{name}_entity_flagged: {str(flag['gap']).lower()}"]
    lines += [f"probe_statistic_entity: {next(iter(probes['entity'].values()))['statistic']}"
              if probes.get("entity") else "probe_statistic_entity: none",
              f"move: {cfg.move}", f"rows_with_move: {int(has_move.sum())}",
              f"rows_up: {int((has_move & (move > 0)).sum())}", f"bootstrap_draws: {pcfg.n_boot}"]
    results = {"stage": "probe", "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "versions": package_versions(),
               "config": {**cfg.model_dump(mode="json"), "protocol_resolved": pcfg.model_dump(mode="json")},
               "rows": {**rows_summary(rows), "template": cfg.template, "with_move": int(has_move.sum())},
               "models": {n: describe(s) for n, s in specs.items()}, "probes": probes,
               "summary": summary_from_lines(lines), "wall_seconds": round(time.time() - t0, 2)}
    path = run.save_json("results.json", _finite(results))
    run.finish({**results["summary"], "results_json": str(path)}, print_lines=False)
    for line in lines:
        print(line)
    print(f"rows: {len(rows)}\nresults_json: {path}")
    return results
