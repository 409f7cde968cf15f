"""`pitlm.eval.evaluate`: the calibrated leakage verdict from a notebook, for embeddings from anywhere.

    >>> import numpy as np, pandas as pd
    >>> from pitlm.eval import evaluate
    >>> rng = np.random.default_rng(0)
    >>> dates = pd.bdate_range("2019-01-01", "2021-12-31")[::10]
    >>> rows = pd.DataFrame([(d, c) for c in range(1000, 1030) for d in dates], columns=["Date", "SecuritiesCode"])
    >>> news = rng.normal(size=len(rows))  # what a leaky model has read about each row's coming move
    >>> rows["Target"] = 0.01 * news + rng.normal(0, 0.01, len(rows))
    >>> leaky = np.c_[news, rng.normal(size=(len(rows), 7))]
    >>> pit = rng.normal(size=(len(rows), 8))
    >>> res = evaluate({"leaky": leaky, "pit": pit}, rows, base="leaky", protocol={"n_boot": 40, "jackknife_groups": 0})
    >>> res.leakage()["leaky"]["flagged"], res.leakage()["pit"]["flagged"]
    (True, False)
    >>> s = res.summary()
    >>> bool(s["sharpe_gap_walk_forward_ci_lo"] > 0)  # leaky minus PIT long-short Sharpe, walk-forward
    True
    >>> print("\\n".join(line for line in res.summary_lines() if line.startswith("leakage_flagged")))
    leakage_flagged: false

`res` is the `EvalResult` of `pitlm eval` (pitlm/eval/result.py): `summary_lines()` are the CLI's key lines,
`to_json()` its results.json `protocols` block, `portfolio` the long-short series. Models are arrays (n_rows, d) in
the rows' order, or any `--model` SPEC: `embeddings:PATH` (aligned by SecuritiesCode, Date), an HF id or dir,
`model:<run>`, ... (those embed the rows' prompts and cache on the volume `vol`, default PITLM_HOME).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pitlm.errors import PitlmError
from pitlm.eval.embed import EmbedOptions, compute_embedding, embed
from pitlm.eval.models import ModelSpec, parse_spec
from pitlm.eval.pipeline import (
    EVAL_PROTOCOL_DEFAULTS,
    check_rows,
    design_matrix,
    match_control,
    matched_control,
    protocol_config,
)
from pitlm.eval.prompts import build_prompts
from pitlm.eval.protocols import PROTOCOLS
from pitlm.eval.protocols.run import ProtocolConfig, evaluate_features
from pitlm.market.features import FEATURES
from pitlm.volume import Volume

# the prompt of rows that carry no price features: what the control sees of a (stock, date) row
KEY_TEMPLATE = "On {date}, securities code {code}"


def _features_in(rows: pd.DataFrame, numeric_features: bool | None) -> bool:
    have = all(c in rows.columns for c in FEATURES)
    if numeric_features and not have:
        raise PitlmError(f"numeric_features=True needs the rows' columns {', '.join(FEATURES)}")
    return have if numeric_features is None else numeric_features


def _protocol(protocol, seed: int):
    if isinstance(protocol, ProtocolConfig):
        return protocol
    options = dict(protocol or {})
    protocols, seed = options.pop("protocols", list(PROTOCOLS)), options.pop("seed", seed)
    return protocol_config(protocols, {**EVAL_PROTOCOL_DEFAULTS, **options}, seed)


def _embedding(name: str, model, rows: pd.DataFrame, prompts, vol, opts, seed: int) -> np.ndarray:
    if isinstance(model, (str, ModelSpec)):
        spec = parse_spec(model, vol, seed) if isinstance(model, str) else model
        keys = rows[["SecuritiesCode", "Date"]]
        if spec.kind == "random-features":  # cheap and deterministic: not cached
            return compute_embedding(spec, prompts(), opts)[0]
        if spec.kind == "embeddings":
            return embed(spec, [], vol, opts, keys).X
        return embed(spec, prompts(), vol or Volume.resolve(), opts).X
    X = np.asarray(model)
    if X.ndim != 2 or len(X) != len(rows):
        raise PitlmError(f"embeddings of '{name}' must be (n_rows={len(rows)}, d), got {X.shape}")
    return X


def evaluate(models: dict[str, Any], rows: pd.DataFrame, *, base: str | None = None, primary: str | None = None,
             control: str | None = "control:random-features", control_match: str = "spectrum",
             protocol=None, template: str | None = None, numeric_features: bool | None = None, seed: int = 0,
             vol=None, embed_options=None, show_progress: bool = False):
    """Every protocol for every model on the same rows and paired bootstrap draws, net of a knowledge-free
    control: what `pitlm eval` computes after its sampling (see the module doc for an example).

    models: {name: (n_rows, d) array | SPEC string | ModelSpec}. rows: one row per (SecuritiesCode, Date) with
    Target, plus whatever the prompt template uses. base/primary: roles as in `pitlm eval` (`sharpe_gap_*`,
    `premium_reduction` = base - arm). control: the control's SPEC (None: no control; it is named "control"
    and, like the eval's, matched to the primary model's spectrum per `control_match`). protocol: a
    ProtocolConfig, or a dict of its fields (and `protocols`) over the eval's defaults (alpha by inner CV).
    template: the prompts of the control and of LM specs (default: the seed's when the rows carry its price
    features, else "On {date}, securities code {code}"). numeric_features: X = [embedding || the seed's five
    features] (default: when the rows have them)."""
    if not models:
        raise PitlmError("give at least one model: {name: embeddings array or SPEC}")
    if control is not None and "control" in models:
        raise PitlmError("model name 'control' is reserved for the control; pick another name (or control=None)")
    missing = [c for c in ("Date", "SecuritiesCode", "Target") if c not in rows.columns]
    if missing:
        raise PitlmError(f"rows lack column(s) {', '.join(missing)}")
    rows = rows.reset_index(drop=True).assign(Date=pd.to_datetime(rows["Date"]).to_numpy())
    pcfg = _protocol(protocol, seed)
    check_rows(rows, pcfg)
    if template is None:
        template = "seed" if all(c in rows.columns for c in ("ret_5d", "ret_30d", "vol_20d")) else KEY_TEMPLATE
    cache: list[list[str]] = []

    def prompts() -> list[str]:
        if not cache:
            cache.append(build_prompts(rows, template))
        return cache[0]

    opts = embed_options or EmbedOptions()
    arrays = {name: _embedding(name, m, rows, prompts, vol, opts, seed) for name, m in models.items()}
    primary_name = primary or next((n for n in arrays if n != base), base)
    if control is not None:
        spec = parse_spec(control, vol, seed)
        if not spec.is_control:
            raise PitlmError(f"control must be a control:... spec (knowledge-free), got '{control}'")
        reference = np.asarray(arrays[primary_name])
        X = _embedding("control", matched_control(spec, reference, control_match), rows, prompts, vol, opts, seed)
        if spec.kind == "random-features":
            X, _ = match_control(X, reference, control_match)
        arrays = {"control": X, **arrays}
    numeric = _features_in(rows, numeric_features)
    features = {name: design_matrix(X, rows, numeric) for name, X in arrays.items()}
    return evaluate_features(features, rows[["Date", "SecuritiesCode", "Target"]], pcfg,
                             control="control" if control is not None else None, base=base, primary=primary,
                             show_progress=show_progress)
