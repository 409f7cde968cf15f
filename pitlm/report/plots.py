"""Matplotlib figures of a report (Agg backend; each returns a Figure that the renderer saves as PNG)."""

from __future__ import annotations

import re
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

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
