"""`EvalResult`: per-model statistics over paired bootstrap draws, their intervals, the control-netted and
base-vs-arm differences, the leakage decision, JSON and grep-able summary lines.

Summary keys (one `key: value` per line). Each statistic K prints `K`, `K_ci_lo`, `K_ci_hi` (point
estimate on the original rows, and the 2.5/97.5 percentiles of the bootstrap draws, the seed's interval).
Model prefixes: the primary model (the trained arm) has none (the seed's `r2_leakage_off:` ...), the base
model `base_`, the control `control_`, any other model `<name>_`. Statistics:
    r2_leakage_off, r2_leakage_on, leakage_premium           (legacy)
    rank_ic_leakage_off, rank_ic_leakage_on, rank_ic_premium (legacy, with rank_ic)
    r2_purged, rank_ic_purged                                (purged)
    r2_walk_forward, rank_ic_walk_forward                    (walk_forward; per-year values in JSON)
and, for every non-control model, the same net of the control: `net_<K>` (model - control, per draw).
Long-short portfolios of the out-of-fold predictions (pitlm/eval/portfolio.py), after each model's lines:
    sharpe_leakage_off, sharpe_purged, sharpe_walk_forward   annualised Sharpe (+ _ci_lo/_ci_hi)
    sharpe_<protocol>_nw_t                                   Newey-West t of the mean daily return (original rows)
    sharpe_<protocol>_day_ci                                 [lo, hi] of a stationary bootstrap over days
    net_sharpe_<protocol>                                    model - control, per draw (+ _ci_lo/_ci_hi, _day_ci)
Comparisons (base - arm, per draw): `premium_reduction`, `r2_purged_reduction`,
`r2_walk_forward_reduction`, and the Sharpe gaps `sharpe_gap_leakage_off`, `sharpe_gap_purged`,
`sharpe_gap_walk_forward` (leaky base minus the PIT arm; each also `_day_ci`) for the primary arm, `<arm>_premium_reduction`,
`<arm>_sharpe_gap_walk_forward` ... for every other arm. Leakage decision per non-control model: `leakage_estimate` (+ `_ci_lo/_ci_hi`
of the decision interval) and `leakage_flagged: true|false`. Then `bootstrap_draws`, `bootstrap_skipped`
(most draws skipped by any statistic) and `outside_ci` (statistics whose point estimate lies outside their
percentile interval, or `none`), both over the leakage statistics; `portfolio_outside_ci` the same for the
long-short ones.
"""

from __future__ import annotations

import numpy as np

from pitlm.errors import PitlmError
from pitlm.eval.bootstrap import summarize
from pitlm.eval.portfolio import DAY_DRAWS, day_intervals
from pitlm.eval.protocols import registry
from pitlm.log import format_value

INTERVALS = {"percentile": ("ci_lo", "ci_hi"), "bca": ("bca_lo", "bca_hi"), "basic": ("basic_lo", "basic_hi")}


def headline() -> tuple[str, ...]:
    """The statistics printed per model, every protocol's `headline` in registry order."""
    return tuple(k for p in registry().values() for k in p.headline)


def sharpes() -> tuple[str, ...]:
    """Long-short Sharpe ratios (pitlm/eval/portfolio.py), printed after each model's `headline` lines."""
    return tuple(f"sharpe_{p.series[1]}" for p in registry().values() if p.series)


def reductions() -> dict[str, str]:
    """Statistic -> name of its base - arm difference: each protocol's leakage statistic, then its Sharpe gap."""
    return ({p.statistic: p.reduction_name for p in registry().values()}
            | {k: k.replace("sharpe_", "sharpe_gap_", 1) for k in sharpes()})


def leakage_order() -> tuple[str, ...]:
    """The protocols' leakage statistics, most preferred as the calibrated estimate first."""
    return tuple(p.statistic for p in sorted(registry().values(), key=lambda p: p.preference))


def is_portfolio_stat(key: str) -> bool:
    """A long-short statistic (sharpe_*, ls_return_*, their net_ and gap keys)."""
    return "sharpe_" in key or "ls_return_" in key


def _finite(obj):
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class EvalResult:
    """Statistics of every model as arrays over count vectors: [original rows, n_boot draws, jackknife]."""

    def __init__(self, config: dict, info: dict, values: dict[str, dict[str, np.ndarray]], n_boot: int,
                 control: str | None = "control", base: str | None = None, primary: str | None = None,
                 portfolio: dict | None = None):
        for role, name in (("control", control), ("base", base), ("primary", primary)):
            if name is not None and name not in values:
                raise PitlmError(f"{role} model '{name}' is not among the models ({', '.join(values)})")
        self.config, self.info, self.values, self.n_boot = config, info, values, n_boot
        self.portfolio = portfolio  # long-short series of the original rows (pitlm.eval.portfolio), or None
        self.control, self.base = control, base
        others = [m for m in values if m not in (control, base)]
        self.primary = primary or (others[0] if others else None)
        self.level = float(config.get("ci_level", 0.95))
        self.decision_ci = config.get("decision_ci", "percentile")
        self._cache: dict[tuple[str, str], dict] = {}

    def role(self, model: str) -> str:
        return {self.primary: "primary", self.base: "base", self.control: "control"}.get(model, "other")

    def prefix(self, model: str) -> str:
        return {"primary": "", "base": "base_", "control": "control_"}.get(self.role(model), f"{model}_")

    def _summ(self, v: np.ndarray, key: tuple[str, str] | None = None) -> dict:
        if key is None:
            return summarize(v, self.n_boot, self.level)
        if key not in self._cache:
            self._cache[key] = summarize(v, self.n_boot, self.level)
        return self._cache[key]

    def metrics(self, model: str) -> dict[str, dict]:
        return {k: self._summ(v, (model, k)) for k, v in self.values[model].items()}

    def net(self, model: str) -> dict[str, dict]:
        return {k: self._summ(v, (model, k)) for k, v in self.net_values(model).items()}

    def comparisons(self) -> dict[str, dict]:
        return {k: self._summ(v, ("comparison", k)) for k, v in self.comparison_values().items()}

    def net_values(self, model: str) -> dict[str, np.ndarray]:
        """Per-draw model - control (paired: the same rows and draws); empty for the control itself."""
        if self.control is None or model == self.control:
            return {}
        ctl = self.values[self.control]
        return {f"net_{k}": v - ctl[k] for k, v in self.values[model].items() if k in ctl}

    def comparison_values(self) -> dict[str, np.ndarray]:
        """Per-draw base - arm for the headline statistics, for every trained arm (every model that is neither
        the base nor the control): the primary arm's keys are the seed's (`premium_reduction` ...), the other
        arms' carry their name (`<arm>_premium_reduction` ...)."""
        if self.base is None:
            return {}
        b = self.values[self.base]
        out = {}
        for arm in self.values:
            if arm in (self.base, self.control):
                continue
            a, prefix = self.values[arm], "" if arm == self.primary else f"{arm}_"
            out.update({prefix + name: b[k] - a[k] for k, name in reductions().items() if k in a and k in b})
        return out

    def leakage_statistic(self) -> str | None:
        stat = self.config.get("leakage_statistic")
        if stat:
            return stat
        have = set().union(*(v.keys() for v in self.values.values())) if self.values else set()
        return next((k for k in leakage_order() if k in have), None)

    def leakage(self) -> dict[str, dict]:
        """Per non-control model: the calibrated leakage estimate (net of the control when there is one) and
        the decision: flagged when the lower end of the `decision_ci` interval is above 0."""
        stat = self.leakage_statistic()
        out = {}
        lo_key, hi_key = INTERVALS[self.decision_ci]
        for m in self.values:
            if m == self.control or stat is None:
                continue
            key = f"net_{stat}" if self.control is not None else stat
            vals = self.net_values(m) if self.control is not None else self.values[m]
            if key not in vals:
                raise PitlmError(f"leakage statistic '{stat}' was not computed (protocols: {self.config.get('protocols')})")
            s = self._summ(vals[key], (m, key))
            out[m] = {"statistic": key, "estimate": s["estimate"], "ci_lo": s[lo_key], "ci_hi": s[hi_key],
                      "interval": self.decision_ci, "flagged": bool(np.isfinite(s[lo_key]) and s[lo_key] > 0),
                      "rule": f"flagged when the {self.level:.0%} {self.decision_ci} interval of {key} lies above 0"}
        return out

    def outside_ci(self, portfolio: bool = False) -> list[str]:
        """Statistics whose point estimate lies outside their percentile interval: the leakage statistics, or
        with `portfolio` the long-short ones (kept apart, so that `outside_ci` means what it meant before)."""
        out = []
        for m in self.values:
            for k, s in {**self.metrics(m), **self.net(m)}.items():
                if s["outside_ci"] and is_portfolio_stat(k) == portfolio:
                    out.append(f"{m}:{k}")
        out += [f"comparison:{k}" for k, s in self.comparisons().items()
                if s["outside_ci"] and is_portfolio_stat(k) == portfolio]
        return out

    def to_json(self, include_draws: bool = False) -> dict:
        """Nested dict (strict JSON: NaN and infinities become None); layout in `pitlm.eval.protocols.run`."""
        return _finite(self._json(include_draws))

    def _json(self, include_draws: bool) -> dict:
        models = {}
        for m in self.values:
            entry = {"role": self.role(m), "n_features": self.info.get("n_features", {}).get(m),
                     "metrics": self.metrics(m), "net": self.net(m)}
            if include_draws:
                entry["draws"] = {k: v[1:1 + self.n_boot].tolist() for k, v in self.values[m].items()}
            models[m] = entry
        skipped = {k: s["n_skipped"] for m in self.values for k, s in self.metrics(m).items()}
        return {
            "config": self.config, "data": self.info,
            "bootstrap": {"n_boot": self.n_boot, "seed": self.config.get("seed"), "level": self.level,
                          "jackknife_groups": self.config.get("jackknife_groups"), "skipped": skipped},
            "roles": {"primary": self.primary, "base": self.base, "control": self.control},
            "models": models,
            "comparisons": self.comparisons(),
            "leakage": self.leakage(),
            "outside_ci": self.outside_ci(),
            **({"portfolio": {**self.portfolio, "day_ci": self.day_intervals()},
                "portfolio_outside_ci": self.outside_ci(portfolio=True)} if self.portfolio is not None else {}),
        }

    def summary(self) -> dict[str, object]:
        """Flat key -> value mapping behind `summary_lines` (see the module doc for the keys)."""
        out: dict[str, object] = {}

        def put(key: str, s: dict) -> None:
            out[key], out[f"{key}_ci_lo"], out[f"{key}_ci_hi"] = s["estimate"], s["ci_lo"], s["ci_hi"]

        order = [m for m in (self.primary, self.base, self.control) if m is not None]
        order += [m for m in self.values if m not in order]
        heads = headline()
        for m in order:
            p, metrics = self.prefix(m), self.metrics(m)
            net = self.net(m)
            for k in heads:
                if k in metrics:
                    put(p + k, metrics[k])
            for k in heads:
                if f"net_{k}" in net:
                    put(f"{p}net_{k}", net[f"net_{k}"])
            self._put_sharpes(m, p, metrics, net, put, out)
        days = self.day_intervals()
        for k, s in self.comparisons().items():
            put(k, s)
            if k in days:
                out[f"{k}_day_ci"] = days[k]
        for m, d in self.leakage().items():
            p = self.prefix(m)
            out[f"{p}leakage_estimate"], out[f"{p}leakage_estimate_ci_lo"] = d["estimate"], d["ci_lo"]
            out[f"{p}leakage_estimate_ci_hi"], out[f"{p}leakage_flagged"] = d["ci_hi"], d["flagged"]
        out["bootstrap_draws"] = self.n_boot
        out["bootstrap_skipped"] = max((s["n_skipped"] for m in self.values for k, s in self.metrics(m).items()
                                        if not is_portfolio_stat(k)), default=0)
        outside = self.outside_ci()
        out["outside_ci"] = ",".join(outside) if outside else "none"
        if self.portfolio is not None:
            outside = self.outside_ci(portfolio=True)
            out["portfolio_outside_ci"] = ",".join(outside) if outside else "none"
        return out

    def _put_sharpes(self, model: str, p: str, metrics: dict, net: dict, put, out: dict) -> None:
        """`<p>sharpe_<s>` (+ CI, day CI), its Newey-West t `<p>sharpe_<s>_nw_t`, and `<p>net_sharpe_<s>`
        (+ CI, day CI)."""
        days = self.day_intervals()
        for k in sharpes():
            if k not in metrics:
                continue
            put(p + k, metrics[k])
            series = (self.portfolio or {}).get("series", {}).get(k[len("sharpe_"):], {})
            if model in series.get("models", {}):
                out[f"{p}{k}_nw_t"] = series["models"][model]["nw_t"]
            if f"{p}{k}" in days:
                out[f"{p}{k}_day_ci"] = days[f"{p}{k}"]
            if f"net_{k}" in net:
                put(f"{p}net_{k}", net[f"net_{k}"])
                if f"{p}net_{k}" in days:
                    out[f"{p}net_{k}_day_ci"] = days[f"{p}net_{k}"]

    def day_intervals(self) -> dict[str, list[float]]:
        """Stationary-bootstrap-over-days intervals (pitlm.eval.portfolio.day_intervals) of every summary key of a
        Sharpe ratio: `<p>sharpe_<s>`, `<p>net_sharpe_<s>` (model - control) and the gaps `sharpe_gap_<s>`,
        `<arm>_sharpe_gap_<s>` (base - arm), the same resampled days for all of them."""
        if self.portfolio is None:
            return {}
        if ("portfolio", "days") in self._cache:
            return self._cache[("portfolio", "days")]
        out: dict[str, list[float]] = {}
        for suffix, entry in self.portfolio["series"].items():
            rets = {m: np.asarray(v["returns"]) for m, v in entry["models"].items()}
            pairs: dict[str, tuple[str, str]] = {}
            for m in rets:
                if self.control in rets and m != self.control:
                    pairs[f"{self.prefix(m)}net_sharpe_{suffix}"] = (m, self.control)
                if self.base in rets and m not in (self.base, self.control):
                    pairs[f"{'' if m == self.primary else m + '_'}sharpe_gap_{suffix}"] = (self.base, m)
            cis, block = day_intervals(rets, entry["periods_per_year"], pairs, int(self.config.get("seed") or 0),
                                       self.level)
            out.update({(f"{self.prefix(k)}sharpe_{suffix}" if k in rets else k): v for k, v in cis.items()})
            entry["day_bootstrap"] = {"mean_block": block, "draws": DAY_DRAWS if cis else 0}
        self._cache[("portfolio", "days")] = out
        return out

    def summary_lines(self) -> list[str]:
        return [f"{k}: {format_value(v)}" for k, v in self.summary().items()]
