"""Matplotlib figures of a report (Agg backend; each returns a Figure that the renderer saves as PNG)."""

from __future__ import annotations

import re
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm
from matplotlib.patches import Rectangle

FLAG = "#c0392b"
CLEAR = "#2c3e50"
CONTROL = "#7f8c8d"


def _interval_rows(ax, rows: list[tuple[str, dict | None, bool]], title: str, xlabel: str,
                   one_sided: bool = False) -> None:
    """rows: (label, summary dict with estimate/ci_lo/ci_hi, is_control). Red = interval excludes 0 (one_sided:
    lies above 0, the direction a leak pushes a leakage statistic; an interval below 0 is not a finding)."""
    ys = np.arange(len(rows))[::-1]
    for y, (_label, s, is_control) in zip(ys, rows, strict=True):
        if not s or not np.isfinite(s.get("estimate", np.nan)):
            ax.text(0, y, "n/a", va="center", ha="center", fontsize=8, color=CONTROL)
            continue
        lo, hi, est = s["ci_lo"], s["ci_hi"], s["estimate"]
        excludes = np.isfinite(lo) and np.isfinite(hi) and (lo > 0 or (hi < 0 and not one_sided))
        colour = CONTROL if is_control else (FLAG if excludes else CLEAR)
        ax.plot([lo, hi], [y, y], color=colour, lw=2.2, solid_capstyle="butt")
        ax.plot([est], [y], "o", color=colour, ms=7, mfc="white" if is_control else colour)
    ax.axvline(0, color="#999", lw=1, ls="--")
    ax.set_yticks(ys)
    ax.set_yticklabels([r[0] for r in rows], fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(axis="x", labelsize=8)


def model_order(results: dict) -> list[str]:
    roles = results["protocols"]["roles"]
    names = list(results["protocols"]["models"])
    first = [n for n in (roles.get("base"), roles.get("primary")) if n in names]
    rest = [n for n in names if n not in first and n != roles.get("control")]
    return first + rest + ([roles["control"]] if roles.get("control") in names else [])


def forest_plot(results: dict) -> plt.Figure:
    """Each model's leakage figures with 95% CIs: the seed's legacy premium, the raw purged R2, and the
    calibrated estimate net of the knowledge-free control (the control beside every model)."""
    proto = results["protocols"]
    control = proto["roles"].get("control")
    order = model_order(results)
    leakage = proto.get("leakage", {})
    stat = next(iter(leakage.values()))["statistic"] if leakage else None
    raw_stat = stat[4:] if stat and stat.startswith("net_") else stat
    panels = []
    if any("leakage_premium" in proto["models"][m]["metrics"] for m in order):
        panels.append(("Legacy premium (seed protocol)", "R² on − R² off",
                       [(m, proto["models"][m]["metrics"].get("leakage_premium"), m == control) for m in order]))
    if raw_stat and raw_stat != "leakage_premium":
        panels.append((f"{raw_stat} (raw)", "out-of-sample R²" if "r2" in raw_stat else raw_stat,
                       [(m, proto["models"][m]["metrics"].get(raw_stat), m == control) for m in order]))
    if leakage:
        panels.append(("Leakage estimate, net of control", f"{stat} (model − control)",
                       [(m, leakage.get(m), False) for m in order if m != control]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.55 * len(order) + 1.6), squeeze=False)
    for ax, (title, xlabel, rows) in zip(axes[0], panels, strict=True):
        _interval_rows(ax, rows, title, xlabel, one_sided=True)
    fig.suptitle("Leakage by model (95% bootstrap CIs; red = CI above 0, grey = knowledge-free control)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def reduction_plot(results: dict) -> plt.Figure | None:
    # the Sharpe gaps (another scale) are drawn by long_short_plot
    comps = {k: v for k, v in (results["protocols"].get("comparisons") or {}).items() if "sharpe_gap" not in k}
    if not comps:
        return None
    rows = [(k, v, False) for k, v in comps.items()]
    fig, ax = plt.subplots(figsize=(6.5, 0.5 * len(rows) + 1.4))
    roles = results["protocols"]["roles"]
    _interval_rows(ax, rows, f"Reduction: {roles.get('base')} − each arm (unprefixed: {roles.get('primary')})",
                   "difference (95% CI)")
    fig.tight_layout()
    return fig


def walk_forward_plot(results: dict) -> plt.Figure | None:
    proto = results["protocols"]
    pat = re.compile(r"^(r2|rank_ic)_walk_forward_(\d{4})$")
    series: dict[str, dict[str, list[tuple[int, float]]]] = {"r2": {}, "rank_ic": {}}
    for m in model_order(results):
        for k, s in proto["models"][m]["metrics"].items():
            hit = pat.match(k)
            if hit:
                series[hit.group(1)].setdefault(m, []).append((int(hit.group(2)), s["estimate"]))
    if not series["r2"]:
        return None
    kinds = [k for k in ("r2", "rank_ic") if series[k]]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 3.6), squeeze=False)
    control = proto["roles"].get("control")
    for ax, kind in zip(axes[0], kinds, strict=True):
        for m, pts in series[kind].items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m,
                    color=CONTROL if m == control else None, ls="--" if m == control else "-")
        ax.axhline(0, color="#999", lw=1)
        ax.set_title(f"Walk-forward {'R²' if kind == 'r2' else 'rank IC'} by test year", fontsize=10)
        ax.set_xlabel("test year", fontsize=9)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


SERIES_TITLES = {"walk_forward": "walk-forward", "purged": "purged", "leakage_off": "legacy test split"}


def long_short_plot(results: dict) -> plt.Figure | None:
    """Cumulative daily top-minus-bottom long-short return of each model's out-of-fold predictions (sum of
    daily returns, flat on dates without a position), one panel per protocol; Sharpe in the legend."""
    proto = results["protocols"]
    series = (proto.get("portfolio") or {}).get("series") or {}
    names = [k for k in SERIES_TITLES if k in series]
    if not names:
        return None
    control = proto["roles"].get("control")
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        entry = series[name]
        dates = np.array(entry["dates"], dtype="datetime64[D]")
        for m in model_order(results):
            if m not in entry["models"]:
                continue
            r = np.nan_to_num(np.asarray(entry["models"][m]["returns"], dtype=float))
            sr = (proto["models"][m]["metrics"].get(f"sharpe_{name}") or {}).get("estimate")
            label = f"{m} (Sharpe {sr:.2f})" if sr is not None else m
            ax.plot(dates, np.cumsum(r), label=label, lw=1.3, color=CONTROL if m == control else None,
                    ls="--" if m == control else "-")
        ax.axhline(0, color="#999", lw=1)
        ax.set_title(f"Long-short, {SERIES_TITLES[name]} ({entry['days']} dates)", fontsize=10)
        ax.set_ylabel("cumulative return", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def knowledge_heatmap(family: dict) -> plt.Figure:
    """The knowledge matrix of a family (results.json `family.<NAME>`): member cutoff (rows) x walk-forward test
    year (columns), colour = the cell's net R2 (diverging around 0), text = estimate and interval; a flagged cell
    is outlined; with ground truth, a known cell is marked K and a partial one P."""
    matrix = family["matrix"]
    members, years = matrix["members"], matrix["years"]
    V = np.array([[np.nan if matrix["cells"][m["name"]][str(y)]["estimate"] is None
                   else matrix["cells"][m["name"]][str(y)]["estimate"] for y in years] for m in members])
    lim = float(np.nanmax(np.abs(V))) if np.isfinite(V).any() else 1.0
    fig, ax = plt.subplots(figsize=(1.5 + 1.25 * len(years), 1.2 + 0.6 * len(members)))
    im = ax.imshow(V, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -lim or -1.0, lim or 1.0), aspect="auto")
    truth = family.get("ground_truth") or {}
    for i, m in enumerate(members):
        for j, y in enumerate(years):
            c = matrix["cells"][m["name"]][str(y)]
            mark = {"known": " K", "partial": " P"}.get(truth.get(m["name"], {}).get(str(y)), "")
            text = "n/a" if c["estimate"] is None else (
                f"{c['estimate']:.2f}{mark}\n[{_fmt(c['ci_lo'])}, {_fmt(c['ci_hi'])}]")
            dark = c["estimate"] is not None and abs(c["estimate"]) > 0.6 * lim  # white on the darkest colours
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
            if c["flagged"]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="black", lw=2))
    ax.set_xticks(range(len(years)), [str(y) for y in years], fontsize=8)
    ax.set_yticks(range(len(members)), [m["cutoff"] for m in members], fontsize=8)
    ax.set_xlabel("walk-forward test year", fontsize=9)
    ax.set_ylabel("member cutoff", fontsize=9)
    ax.set_title(f"Knowledge matrix of {family.get('name', 'the family')}: net walk-forward R² "
                 "(outlined: CI above 0" + ("; K known, P partly known" if truth else "") + ")", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def family_slope_plot(family: dict, results: dict) -> plt.Figure | None:
    """Each member's seed premium (legacy) and calibrated statistic against its cutoff, with their percentile
    intervals, and the fitted family slopes."""
    panels = [(k, t) for k, t in (("slope", "seed's leakage premium"), ("slope_calibrated", "net walk-forward R²"))
              if k in family]
    if not panels:
        return None
    proto = results["protocols"]["models"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        slope = family[key]
        stat = slope["statistic"]
        x = np.array(slope["cutoff_years"])  # years since 2000-01-01: the slope's own x
        ests, los, his = [], [], []
        for m in slope["members"]:
            entry = proto[m]["net" if stat.startswith("net_") else "metrics"].get(stat) or {}
            ests.append(entry.get("estimate", np.nan))
            los.append(entry.get("ci_lo", np.nan))
            his.append(entry.get("ci_hi", np.nan))
        ests, los, his = (np.array(v, dtype=float) for v in (ests, los, his))
        ax.errorbar(x, ests, yerr=[ests - los, his - ests], fmt="o", color=CLEAR, capsize=3)
        if slope.get("estimate") is not None:
            xm, ym = x.mean(), np.nanmean(ests)
            ax.plot(x, ym + slope["estimate"] * (x - xm), color=FLAG if (slope.get("ci_lo") or 0) > 0 else CONTROL,
                    label=f"slope {slope['estimate']:.3g} / year [{_fmt(slope.get('ci_lo'))}, "
                          f"{_fmt(slope.get('ci_hi'))}]")
            ax.legend(fontsize=8)
        ax.axhline(0, color="#999", lw=1)
        ax.set_title(f"{title} vs member cutoff", fontsize=10)
        cutoffs = {m["name"]: m["cutoff"] for m in family["matrix"]["members"]}
        ax.set_xticks(x, [cutoffs.get(m, "") for m in slope["members"]], fontsize=8)
        ax.set_xlabel("member cutoff", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def loss_plot(curves: list[Any]) -> plt.Figure | None:
    curves = [c for c in curves if c.steps or c.val_steps]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for c in curves:
        (line,) = ax.plot(c.steps, c.train_loss, lw=1.2, label=f"{c.name} train")
        if c.val_steps:
            ax.plot(c.val_steps, c.val_loss, ls="--", marker=".", color=line.get_color(), label=f"{c.name} val")
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel("loss (nats/token)", fontsize=9)
    ax.set_title("Training loss", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


PROBE_TITLES = {"mink": "Min-K% (realised − opposite)", "minkpp": "Min-K%++ (realised − opposite)",
                "direction_accuracy": "direction accuracy", "lap_interaction": "LAP interaction (f × l)",
                "entity_gap": "entity gap (named − anonymised)"}


def probe_rows(results: dict) -> dict[str, list[tuple[str, dict | None, bool]]]:
    """Per probe statistic: (model, its net summary, False) rows, from a `pitlm probe` results.json."""
    probes = results.get("probes") or {}
    out: dict[str, list[tuple[str, dict | None, bool]]] = {}
    for name, entry in (probes.get("lm") or {}).items():
        for stat, s in entry["stats"].items():
            out.setdefault(stat, []).append((name, s["net"], False))
    for name, e in (probes.get("entity") or {}).items():
        out.setdefault("entity_gap", []).append((name, e["gap"], False))
    order = list(PROBE_TITLES)  # results.json stores keys sorted: show the probes in one fixed order
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def probe_plot(results: dict) -> plt.Figure | None:
    """Each knowledge probe's statistic net of its knowledge-free control, per model, with 95% CIs (red: above
    0, the direction knowledge pushes every one of them)."""
    panels = probe_rows(results)
    if not panels:
        return None
    n_models = max(len(rows) for rows in panels.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 0.5 * n_models + 1.6), squeeze=False)
    for ax, (stat, rows) in zip(axes[0], panels.items(), strict=True):
        _interval_rows(ax, rows, PROBE_TITLES.get(stat, stat), "model − control", one_sided=True)
    fig.suptitle("Knowledge probes, net of the knowledge-free control (95% bootstrap CIs; red = CI above 0)",
                 fontsize=10)
    fig.tight_layout()
    return fig
