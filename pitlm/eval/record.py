"""The record of an eval run: `runs/<id>/results.json`, and the summary lines' values.

Layout (top-level keys):
    stage, created_utc, versions          what made it
    config                                the resolved EvalConfig, plus `protocol_resolved`: the ProtocolConfig used
    rows                                  n, stocks, dates, first/last date, prompts_sha256, template
    models                                per name: spec, kind, path/base/arch/options, fingerprint, embedding_key,
                                          embedding_dim, n_features, cached, embed_seconds, device, dtype,
                                          prompts_per_s; the control also control_match (+ control_scale or
                                          control_rank)
    control, base                         names of the control and of the base model
    protocols                             EvalResult.to_json() (pitlm/eval/result.py): per model the metrics
                                          and net-of-control figures with percentile/basic/BCa intervals and draw
                                          counts, comparisons (premium_reduction ...), the leakage decision,
                                          bootstrap settings and skipped draws, statistics outside their CI,
                                          and `portfolio` (pitlm/eval/portfolio.py): per protocol the dates,
                                          each model's daily long-short returns, Newey-West t, day-bootstrap CIs
    summary                               the printed `key: value` lines, parsed
    timings                               embed_seconds, stats_seconds
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd

from pitlm.volume import package_versions


def parse_value(text: str) -> Any:
    """'0.0123' -> 0.0123, '[0.1, 0.2]' -> [0.1, 0.2], 'true' -> True, else the string."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        return [parse_value(t) for t in text[1:-1].split(",") if t.strip()]
    if text in ("true", "false"):
        return text == "true"
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


def summary_from_lines(lines: list[str]) -> dict[str, Any]:
    out = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = parse_value(value)
    return out


def rows_summary(rows: pd.DataFrame) -> dict[str, Any]:
    return {"n": len(rows), "stocks": int(rows["SecuritiesCode"].nunique()), "dates": int(rows["Date"].nunique()),
            "first_date": str(rows["Date"].min().date()), "last_date": str(rows["Date"].max().date())}


def eval_results(cfg, protocol_cfg, rows: pd.DataFrame, models: dict[str, Any], protocols: dict[str, Any],
                 lines: list[str], prompts_sha: str, timings: dict[str, float]) -> dict[str, Any]:
    return {
        "stage": "eval",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": package_versions(),
        "config": {**cfg.model_dump(mode="json"), "protocol_resolved": protocol_cfg.model_dump(mode="json")},
        "rows": {**rows_summary(rows), "prompts_sha256": prompts_sha, "template": cfg.template},
        "models": models,
        "control": cfg.control_name,
        "base": cfg.base,
        "protocols": protocols,
        "summary": summary_from_lines(lines),
        "timings": timings,
    }
