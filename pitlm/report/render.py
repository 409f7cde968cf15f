"""Turn collected report data into report.html (self-contained: PNGs embedded as base64), PNG files and
report.md, with a plain-language verdict per model."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from pitlm.log import format_value
from pitlm.report import plots
from pitlm.report.collect import ReportData
from pitlm.volume import atomic_write_bytes, atomic_write_text


def _ci(s: dict | None) -> str:
    if not s:
        return "n/a"
    return f"{format_value(s['estimate'])} [{format_value(s['ci_lo'])}, {format_value(s['ci_hi'])}]"


def verdicts(results: dict) -> list[dict[str, Any]]:
    """One verdict per model: the calibrated decision (net of the control) and what the legacy protocol says."""
    proto = results["protocols"]
    control = proto["roles"].get("control")
    level = proto.get("bootstrap", {}).get("level", 0.95)
    out = []
    for m in plots.model_order(results):
        metrics = proto["models"][m]["metrics"]
        legacy = metrics.get("leakage_premium")
        legacy_flag = bool(legacy and legacy["ci_lo"] > 0)
        legacy_text = (f"the legacy (seed) protocol {'flags' if legacy_flag else 'does not flag'} it: premium "
                       f"{_ci(legacy)}" if legacy else "legacy protocol not run")
        if m == control:
            text = (f"knowledge-free control (knows nothing by construction); {legacy_text}"
                    + (" — the legacy protocol reports 'leakage' for a model that cannot know the future"
                       if legacy_flag else ""))
            out.append({"model": m, "role": "control", "flagged": None, "legacy_flagged": legacy_flag, "text": text})
            continue
        d = proto.get("leakage", {}).get(m)
        if d is None:
            out.append({"model": m, "role": proto["models"][m]["role"], "flagged": None,
                        "legacy_flagged": legacy_flag, "text": legacy_text})
            continue
        word = "detected" if d["flagged"] else "not detected"
        text = (f"leakage {word} at {level:.0%}, net of the knowledge-free control ({d['statistic']} = "
                f"{_ci(d)}); {legacy_text}")
        out.append({"model": m, "role": proto["models"][m]["role"], "flagged": d["flagged"],
                    "legacy_flagged": legacy_flag, "text": text})
    return out


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _table(headers: list[str], rows: list[list[Any]]) -> tuple[str, str]:
    """(html, markdown) for a small table."""
    cell = lambda v: format_value(v) if not isinstance(v, str) else v  # noqa: E731
    h = "<table><tr>" + "".join(f"<th>{html.escape(x)}</th>" for x in headers) + "</tr>"
    h += "".join("<tr>" + "".join(f"<td>{html.escape(cell(v))}</td>" for v in r) + "</tr>" for r in rows) + "</table>"
    md = "| " + " | ".join(headers) + " |\n|" + "---|" * len(headers) + "\n"
    md += "".join("| " + " | ".join(cell(v) for v in r) + " |\n" for r in rows)
    return h, md


class Page:
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.html: list[str] = []
        self.md: list[str] = []
        self.pngs: list[Path] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")
        self.md.append("#" * level + " " + text + "\n")

    def para(self, text: str) -> None:
        self.html.append(f"<p>{html.escape(text)}</p>")
        self.md.append(text + "\n")

    def bullets(self, items: list[str], classes: list[str] | None = None) -> None:
        classes = classes or [""] * len(items)
        self.html.append("<ul>" + "".join(f'<li class="{c}">{html.escape(t)}</li>' for t, c in zip(items, classes, strict=True))
                         + "</ul>")
        self.md.append("".join(f"- {t}\n" for t in items))

    def table(self, headers: list[str], rows: list[list[Any]]) -> None:
        h, md = _table(headers, rows)
        self.html.append(h)
        self.md.append(md)

    def figure(self, fig: plt.Figure | None, name: str, alt: str) -> None:
        if fig is None:
            return
        data = _png(fig)
        path = atomic_write_bytes(self.out_dir / f"{name}.png", data)
        self.pngs.append(path)
        self.html.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">')
        self.md.append(f"![{alt}]({name}.png)\n")


CSS = """body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:24px auto;
padding:0 16px;color:#222;line-height:1.45}h1{font-size:24px}h2{font-size:19px;border-bottom:1px solid #ddd;
padding-bottom:4px;margin-top:32px}h3{font-size:16px}img{max-width:100%;height:auto;display:block;margin:10px 0}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:left}th{background:#f3f3f3}li.flag{color:#c0392b}li.clear{color:#1e6b3a}li.control{color:#555}
.small{color:#666;font-size:12px}"""


def eval_section(page: Page, run_id: str, results: dict, index: int) -> None:
    rows = results.get("rows", {})
    page.heading(f"Leakage evaluation ({run_id})")
    page.para(f"Market '{results['config'].get('market')}': {rows.get('n')} rows, {rows.get('stocks')} stocks, "
              f"{rows.get('first_date')} .. {rows.get('last_date')}; template '{rows.get('template')}'; protocols "
              f"{', '.join(results['config'].get('protocols', []))}; {results['protocols']['bootstrap']['n_boot']} "
              f"paired stock-clustered bootstrap draws.")
    page.heading("Verdicts", 3)
    vs = verdicts(results)
    page.bullets([f"{v['model']}: {v['text']}" for v in vs],
                 ["control" if v["role"] == "control" else ("flag" if v["flagged"] else "clear") for v in vs])
    page.figure(plots.forest_plot(results), f"forest_{index}", "forest plot of leakage estimates")
    page.figure(plots.reduction_plot(results), f"reduction_{index}", "premium reduction of the trained arm")
    page.figure(plots.walk_forward_plot(results), f"walk_forward_{index}", "walk-forward R2 and rank IC per year")
    proto = results["protocols"]
    keys = [k for k in ("r2_leakage_off", "r2_leakage_on", "leakage_premium", "r2_purged", "r2_walk_forward",
                        "rank_ic_purged") if any(k in proto["models"][m]["metrics"] for m in proto["models"])]
    table = [[m] + [_ci(proto["models"][m]["metrics"].get(k)) for k in keys] for m in plots.model_order(results)]
    page.table(["model"] + keys, table)
    portfolio_section(page, results, index)
    for j, (name, family) in enumerate((results.get("family") or {}).items()):
        family_section(page, name, family, results, f"{index}_{j}")
    outside = proto.get("outside_ci") or []
    if outside:
        page.para("Point estimates outside their own percentile CI (bias; see the BCa/basic intervals in "
                  f"results.json): {', '.join(outside)}.")


def portfolio_section(page: Page, results: dict, index: int) -> None:
    """Long-short economics: the cumulative-return plot and each model's Sharpe, net Sharpe, Newey-West t and
    the leaky-minus-PIT gaps, per protocol (pitlm/eval/portfolio.py)."""
    proto = results["protocols"]
    portfolio = proto.get("portfolio")
    if not portfolio:
        return
    page.heading("Long-short portfolios", 3)
    page.para(f"Each date's rows ranked by the out-of-fold prediction: top minus bottom "
              f"{portfolio.get('quantile', 0.2):.0%}, equal-weighted, one-day holding; annualised Sharpe with a "
              "stock-clustered bootstrap CI (paired across models; errs toward 0) and a stationary bootstrap CI "
              "over days; Newey-West t of the mean daily return.")
    page.figure(plots.long_short_plot(results), f"long_short_{index}", "cumulative long-short return per model")
    day_ci = portfolio.get("day_ci") or {}
    rows = []
    for name in plots.SERIES_TITLES:
        entry = portfolio["series"].get(name)
        if not entry:
            continue
        for m in plots.model_order(results):
            if m not in entry["models"]:
                continue
            metrics, net = proto["models"][m]["metrics"], proto["models"][m].get("net", {})
            p = {"primary": "", "base": "base_", "control": "control_"}.get(proto["models"][m]["role"], f"{m}_")
            days = day_ci.get(f"{p}sharpe_{name}")
            rows.append([plots.SERIES_TITLES[name], m, _ci(metrics.get(f"sharpe_{name}")),
                         format_value(days) if days else "n/a", _ci(net.get(f"net_sharpe_{name}")),
                         entry["models"][m].get("nw_t"), entry["models"][m].get("days_with_position")])
    page.table(["protocol", "model", "Sharpe [draw CI]", "Sharpe day CI", "net of control", "NW t",
                "dates with a position"], rows)
    gaps = [[k, _ci(v), format_value(day_ci[k]) if k in day_ci else "n/a"]
            for k, v in (proto.get("comparisons") or {}).items() if "sharpe_gap" in k]
    if gaps:
        page.table([f"gap ({proto['roles'].get('base')} − arm)", "draw CI", "day CI"], gaps)


def family_section(page: Page, name: str, family: dict, results: dict, key: str) -> None:
    """A family of PIT models: the knowledge matrix (heatmap), the premium and calibrated statistic against the
    cutoff with their slopes, and with ground truth the staircase verdict (pitlm/eval/family.py)."""
    page.heading(f"Family '{name}': leakage against the model's cutoff", 3)
    members = family["matrix"]["members"]
    page.para(f"{len(members)} members (cutoffs {', '.join(m['cutoff'] for m in members)}), scored on the same rows "
              f"and paired draws. Cell = {family['matrix']['statistic']} of a test year, net of "
              f"'{family['matrix'].get('net_of')}'; {family['matrix']['rule']}.")
    page.figure(plots.knowledge_heatmap({"name": name, **family}), f"knowledge_{key}", f"knowledge matrix of {name}")
    page.figure(plots.family_slope_plot(family, results), f"family_slope_{key}", f"premium vs cutoff of {name}")
    rows = [[label, family[k]["statistic"], _ci(family[k]), family[k].get("n_skipped")]
            for k, label in (("slope", "family_slope"), ("slope_calibrated", "family_slope_calibrated"))
            if k in family]
    if rows:
        page.table(["line", "statistic", "slope per year of cutoff [CI]", "draws skipped"], rows)
    st = family.get("staircase")
    if st:
        verdict = ("the staircase holds: every known cell is flagged and no unknown one" if st["ok"] else
                   f"the staircase fails: missed {', '.join(st['missed']) or 'none'}; false flags "
                   f"{', '.join(st['false_flags']) or 'none'}")
        page.para(f"Ground truth from {family.get('ground_truth_world')}: a member knows a year's planted moves when "
                  f"the news reporting them was crawled by its cutoff. {st['judged']} cells judged; {verdict}.")


def probe_flags(results: dict) -> dict[str, list[str]]:
    """Per model, the probe statistics that `pitlm probe` flagged (its recorded decisions), in the plots' order."""
    probes = results.get("probes") or {}
    out: dict[str, list[str]] = {}
    for stat, rows in plots.probe_rows(results).items():
        for m, _, _ in rows:
            flagged = (probes["entity"][m]["flagged"]["gap"] if stat == "entity_gap"
                       else probes["lm"][m]["stats"][stat]["flagged"])
            out.setdefault(m, []).extend([stat] if flagged else [])
    return out


def _flag_cell(s: dict | None, flagged: bool | None) -> str:
    return "n/a" if not s else _ci(s) + (" ▲" if flagged else "")


def probe_section(page: Page, run_id: str, results: dict, index: int, regression: dict[str, dict],
                  calibrated: dict[str, bool]) -> None:
    """Knowledge probes beside the regression verdict: per model each probe's statistic net of its control
    (pitlm/eval/probe.py), the eval's verdict for the same model name where the report has one, and which probe
    tests `pitlm calibrate --probe` found calibrated."""
    rows_info = results.get("rows", {})
    cfg = results.get("config", {})
    page.heading(f"Knowledge probes ({run_id})")
    page.para(f"Market '{cfg.get('market')}': {rows_info.get('n')} rows ({rows_info.get('with_move')} with a move, "
              f"move = {cfg.get('move')}), template '{rows_info.get('template')}'; the eval's paired stock-clustered "
              f"draws ({results.get('summary', {}).get('bootstrap_draws')}). Each statistic is the model's minus its "
              "knowledge-free control's, per draw; ▲ = 95% CI above 0 (flagged).")
    page.figure(plots.probe_plot(results), f"probes_{index}", "knowledge probes net of control")
    panels = plots.probe_rows(results)
    probes = results.get("probes") or {}
    lm, entity = probes.get("lm") or {}, probes.get("entity") or {}
    models = list(dict.fromkeys([*lm, *entity]))
    headers = ["model", "regression verdict (eval)"] + [plots.PROBE_TITLES.get(k, k) for k in panels]
    table = []
    for m in models:
        cells = [m, regression[m]["text"].split(";")[0] if m in regression else
                 (_flag_cell(entity[m]["named"], entity[m]["flagged"]["named"]) + " (named, net)" if m in entity
                  else "n/a")]
        for stat in panels:
            if stat == "entity_gap":
                e = entity.get(m)
                cells.append(_flag_cell(e["gap"], e["flagged"]["gap"]) if e else "n/a")
            else:
                s = (lm.get(m) or {}).get("stats", {}).get(stat)
                cells.append(_flag_cell(s["net"], s["flagged"]) if s else "n/a")
        table.append(cells)
    page.table(headers, table)
    if calibrated:
        bad = [k for k, ok in calibrated.items() if not ok]
        page.para("Calibration of the probe tests (`pitlm calibrate --probe`): "
                  + (f"NOT calibrated (false-positive rate above the limit): {', '.join(bad)} — their flags are "
                     "not evidence of knowledge; " if bad else "")
                  + f"calibrated: {', '.join(k for k, ok in calibrated.items() if ok) or 'none'}.")
    else:
        page.para("No probe calibration in this report: run `pitlm calibrate --probe mink,entity,lap` and add its "
                  "run to know each probe test's false-positive rate before trusting a flag.")


def calibration_section(page: Page, run_id: str, cal: dict) -> None:
    """One calibrate run, whichever its mode: the protocols' table, the probes' (--probe) or the knowledge
    matrix's cells (--family)."""
    page.heading(f"Calibration ({run_id})")
    page.para(f"{cal['config'].get('worlds')} null worlds (leak_strength 0) and as many planted worlds (strength "
              f"{cal.get('leak_strength')}); a test is calibrated when its nominal-5% decision rejects in <= 10% of "
              "null worlds.")
    rate = lambda r, k: f"{r[k]:.2f} [{r[k + '_ci'][0]:.2f}, {r[k + '_ci'][1]:.2f}]"  # noqa: E731
    if "table" in cal:
        headers = ["protocol", "false-positive rate", "power", "calibrated", "control raw rejection (null)"]
        rows = [[p, r.get("fpr"), r.get("power"), "yes" if r.get("calibrated") else "no",
                 r.get("control_raw_rejection_null")] for p, r in cal["table"].items()]
        page.table(headers, rows)
    if "probes" in cal:
        order = list(plots.PROBE_TITLES)
        stats = sorted(cal["probes"], key=lambda k: order.index(k) if k in order else len(order))
        page.para("Knowledge probes (`--probe`): simulated LM scores on the worlds' real rows, so this calibrates "
                  "each probe's test, not the link from an LM's reading to its token scores (pitlm/eval/probecal.py).")
        page.table(["probe statistic", "false-positive rate [95% CI]", "power [95% CI]", "calibrated",
                    "raw rejection (null)"],
                   [[s, rate(cal["probes"][s], "fpr"), rate(cal["probes"][s], "power"),
                     "yes" if cal["probes"][s]["calibrated"] else "NO", cal["probes"][s].get("raw_rejection_null")]
                    for s in stats])
    if "family" in cal:
        fam = cal["family"]
        page.para("Knowledge-matrix cells (`--family`): known cells give the power, unknown and null cells the "
                  "false-positive rate; " + ("calibrated." if fam.get("calibrated") else "NOT calibrated."))
        page.table(["cell type", "cells", "flagged share [95% CI]", "meaning"],
                   [[t, r["cells"], rate(r, "rate"), r["meaning"]] for t, r in fam["types"].items() if r["cells"]])


def corpus_section(page: Page, corpora: dict[str, dict]) -> None:
    page.heading("Corpora")
    rows = []
    for name, m in corpora.items():
        tokens = m.get("tokens") or {}
        docs = m.get("docs") or {}
        drops = ", ".join(f"{k}={v}" for k, v in docs.items() if k.startswith("dropped") and v)
        cutoff = ", ".join(m["cutoffs"]) if len(m.get("cutoffs") or []) > 1 else m.get("cutoff", "?")  # nested
        rows.append([name, cutoff, tokens.get("train", "?"), tokens.get("val", "?"),
                     docs.get("kept", "?"), drops or "none", f"{m.get('min_doc_date')} .. {m.get('max_doc_date')}",
                     f"{len(m.get('dumps_used') or [])} used, {len(m.get('dumps_skipped') or [])} skipped (after cutoff)"])
    page.table(["corpus", "cutoff", "train tokens", "val tokens", "docs kept", "dropped (docs)", "doc dates", "dumps"],
               rows)


def render(data: ReportData, out_dir: Path, title: str = "pitlm report") -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    page = Page(out_dir)
    page.html.append(f"<h1>{html.escape(title)}</h1>")
    page.md.append(f"# {title}\n")
    for i, (run_id, results) in enumerate(data.evals):
        eval_section(page, run_id, results, i)
    regression = {v["model"]: v for _, results in data.evals for v in verdicts(results)}
    calibrated = {s: bool(r.get("calibrated")) for _, cal in data.calibrations
                  for s, r in (cal.get("probes") or {}).items()}
    for i, (run_id, results) in enumerate(data.probes):
        probe_section(page, run_id, results, i, regression, calibrated)
    for run_id, cal in data.calibrations:
        calibration_section(page, run_id, cal)
    if data.curves:
        page.heading("Training")
        page.figure(plots.loss_plot(data.curves), "loss", "training loss curves")
        page.table(["run", "val_loss_final", "train_loss_final", "tokens_per_second", "trainable_params"],
                   [[c.name, c.summary.get("val_loss_final", "?"), c.summary.get("train_loss_final", "?"),
                     c.summary.get("tokens_per_second", "?"), c.summary.get("trainable_params", "?")]
                    for c in data.curves])
    if data.corpora:
        corpus_section(page, data.corpora)
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body>{''.join(page.html)}</body></html>")
    html_path = atomic_write_text(out_dir / "report.html", doc)
    md_path = atomic_write_text(out_dir / "report.md", "\n".join(page.md))
    return {"html": html_path, "markdown": md_path, **{p.stem: p for p in page.pngs}}
