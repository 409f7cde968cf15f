"""Families of PIT models (DESIGN.md §7): the knowledge matrix, the family slope and the staircase check, as
pure functions over one `EvalResult` in which every member was scored on the same rows and the same paired
bootstrap draws (no embedding here).

    members = {"m2018": date(2018, 12, 31), "m2019": date(2019, 12, 31), "m2020": date(2020, 12, 31)}
    known = {m: known_years(world_dir, c) for m, c in members.items()}      # synthetic world only
    report = family_report(result, members, known_years_of=known)
    print("\\n".join(family_summary_lines(report)))

Definitions.
- Cell (m, y) of the **knowledge matrix** = member m's `net_r2_walk_forward_<y>` (walk-forward R2 of test year
  y, model minus control per draw; the raw `r2_walk_forward_<y>` when the eval has no control), its estimate on
  the original rows and its percentile interval (`summarize`, the eval's `ci_level`, 95% by default). A cell
  is *flagged* when the interval's lower end is above 0.
- **family_slope** = the OLS slope of a statistic against the member's cutoff in decimal years,
  x = (c_m - 2000-01-01).days / 365.25, computed on the original rows, on every bootstrap draw and on every
  jackknife replicate (vectorised), so it is laid out like any other statistic and `summarize` gives its
  percentile interval. A draw where any member's value is NaN is skipped (counted in `n_skipped`). It is
  computed for the seed's `leakage_premium` (raw, as the seed reports it) and for the calibrated statistic,
  which here is `net_r2_walk_forward` (`r2_walk_forward` without a control): the mean of the matrix's per-year
  net values, so the slope summarises the same numbers as the matrix (the purged R2 mixes every year into
  one fold set and cannot show a staircase).
- **Ground truth** (synthetic world): member m knows the planted move of (company, period) p when some news
  document reporting p was crawled on or before the end of c_m's day (UTC; news_index.parquet). The known
  share of a year = the share of the year's ground-truth rows whose (company, period) is known. A cell is
  *known* at share 1, *unknown* at share 0 and *partial* in between (e.g. a cutoff between the end of a
  half-year and the crawls that report it). `family_staircase_ok: true` when every known cell that is
  detectable is flagged and no unknown cell is flagged; partial cells are not judged.

Summary lines (grep-able, one `key: value` each; numbers as in every stage's summary):
    family_slope: <est>                       the seed's leakage_premium against cutoff (per year)
    family_slope_ci_lo: <lo>
    family_slope_ci_hi: <hi>
    family_slope_skipped: <n>                 draws skipped (a member's value NaN)
    family_slope_calibrated: <est>            net_r2_walk_forward against cutoff
    family_slope_calibrated_ci_lo: <lo>
    family_slope_calibrated_ci_hi: <hi>
    family_slope_calibrated_skipped: <n>
    knowledge_<member>_<year>: <est> [<lo>, <hi>] flagged|-      one per cell, members by cutoff, years up
    family_staircase_ok: true|false           only when ground truth is given
    family_staircase_missed: <member>_<year>,... | none      known, detectable, not flagged
    family_staircase_false_flags: <member>_<year>,... | none unknown but flagged
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from pitlm.errors import PitlmError
from pitlm.eval.bootstrap import summarize
from pitlm.eval.protocols.walk_forward import PROTOCOL as WALK_FORWARD
from pitlm.eval.result import EvalResult
from pitlm.log import format_value
from pitlm.train.paths import model_dir, split_member_spec
from pitlm.volume import Volume

EPOCH = date(2000, 1, 1)
# the matrix's cells are the walk-forward protocol's per-test-year statistic, its slope the protocol's statistic
WALK_FORWARD_PREFIX = WALK_FORWARD.per_year
CALIBRATED = WALK_FORWARD.statistic
SEED_PREMIUM = "leakage_premium"


def as_cutoff(c: date | str) -> date:
    if isinstance(c, datetime):
        return c.date()
    if isinstance(c, date):
        return c
    try:
        return date.fromisoformat(str(c))
    except ValueError:
        raise PitlmError(f"cutoff '{c}' is not a date (YYYY-MM-DD)") from None


def cutoff_years(c: date | str) -> float:
    """The member's cutoff in decimal years since 2000-01-01 (days / 365.25): the slope's x."""
    return (as_cutoff(c) - EPOCH).days / 365.25


def sorted_members(result: EvalResult, members: Mapping[str, date | str]) -> list[tuple[str, date]]:
    """(name, cutoff) by cutoff then name; every name must be a model of the eval."""
    if not members:
        raise PitlmError("a family needs at least one member (NAME@CUTOFF)")
    missing = [m for m in members if m not in result.values]
    if missing:
        raise PitlmError(f"family member(s) {', '.join(missing)} not among the eval's models ({', '.join(result.values)})")
    if result.control in members:
        raise PitlmError(f"the control '{result.control}' cannot be a family member")
    return sorted(((m, as_cutoff(c)) for m, c in members.items()), key=lambda mc: (mc[1], mc[0]))


def member_values(result: EvalResult, member: str, statistic: str) -> np.ndarray:
    """A statistic's array over count vectors: a raw one (`leakage_premium`) or a netted one (`net_...`)."""
    if statistic.startswith("net_"):
        vals = result.net_values(member)
    else:
        vals = result.values[member]
    if statistic not in vals:
        why = " (the eval has no control)" if statistic.startswith("net_") and result.control is None else ""
        raise PitlmError(f"statistic '{statistic}' was not computed for '{member}'{why}; protocols: "
                         f"{result.config.get('protocols')}")
    return np.asarray(vals[statistic], dtype=np.float64)


def cell_statistic(result: EvalResult, year: int) -> str:
    return f"net_{WALK_FORWARD_PREFIX}{year}" if result.control is not None else f"{WALK_FORWARD_PREFIX}{year}"


def walk_forward_years(result: EvalResult, names: Iterable[str]) -> list[int]:
    """Test years with a walk-forward R2 for every given model."""
    per = [{int(k[len(WALK_FORWARD_PREFIX):]) for k in result.values[m]
            if k.startswith(WALK_FORWARD_PREFIX) and k[len(WALK_FORWARD_PREFIX):].isdigit()} for m in names]
    return sorted(set.intersection(*per)) if per else []


def _clean(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def knowledge_matrix(result: EvalResult, members: Mapping[str, date | str], years: Iterable[int] | None = None) -> dict:
    """Cells (m, y) = net walk-forward R2 of test year y with interval and flag (see the module doc). JSON-able
    (NaN -> None); `cells[member][str(year)]`."""
    order = sorted_members(result, members)
    have = walk_forward_years(result, [m for m, _ in order])
    if not have:
        raise PitlmError("the knowledge matrix needs the walk_forward protocol (no r2_walk_forward_<year> values)")
    years = sorted(int(y) for y in years) if years is not None else have
    lacking = [y for y in years if y not in have]
    if lacking:
        raise PitlmError(f"no walk-forward test year {', '.join(map(str, lacking))}; the eval's: {', '.join(map(str, have))}")
    cells: dict[str, dict[str, dict]] = {}
    for m, _ in order:
        cells[m] = {}
        for y in years:
            s = summarize(member_values(result, m, cell_statistic(result, y)), result.n_boot, result.level)
            lo = s["ci_lo"]
            cells[m][str(y)] = {"estimate": _clean(s["estimate"]), "ci_lo": _clean(lo), "ci_hi": _clean(s["ci_hi"]),
                                "n_draws": s["n_draws"], "n_skipped": s["n_skipped"],
                                "flagged": bool(np.isfinite(lo) and lo > 0)}
    return {"statistic": cell_statistic(result, "<year>"), "net_of": result.control, "level": result.level,
            "rule": f"flagged when the {result.level:.0%} percentile interval lies above 0",
            "members": [{"name": m, "cutoff": c.isoformat()} for m, c in order], "years": years, "cells": cells}


def slope_per_draw(x: np.ndarray, V: np.ndarray) -> np.ndarray:
    """OLS slope of every column of V (members x count vectors) on x; NaN where any member's value is NaN."""
    x = np.asarray(x, dtype=np.float64)
    dx = x - x.mean()
    sxx = float(dx @ dx)
    assert sxx > 0, "needs two distinct cutoffs"
    slope = dx @ (V - V.mean(0)) / sxx
    return np.where(np.isfinite(V).all(0), slope, np.nan)


def family_slope(result: EvalResult, members: Mapping[str, date | str], statistic: str) -> dict:
    """Slope of `statistic` (per year of cutoff) with its percentile interval over the paired draws."""
    order = sorted_members(result, members)
    x = np.array([cutoff_years(c) for _, c in order])
    if len(np.unique(x)) < 2:
        raise PitlmError("family_slope needs members with at least two distinct cutoffs")
    V = np.stack([member_values(result, m, statistic) for m, _ in order])
    values = slope_per_draw(x, V)
    s = summarize(values, result.n_boot, result.level)
    return {"statistic": statistic, "x": "cutoff in years since 2000-01-01 ((c - 2000-01-01).days / 365.25)",
            "members": [m for m, _ in order], "cutoff_years": x.tolist(),
            "member_estimates": [_clean(v) for v in V[:, 0]],
            **{k: (_clean(v) if isinstance(v, float) else v) for k, v in s.items()}}


def calibrated_statistic(result: EvalResult) -> str:
    return f"net_{CALIBRATED}" if result.control is not None else CALIBRATED


# ---- ground truth (synthetic world) ----

def known_shares(world_dir: str | Path, cutoff: date | str) -> dict[int, float]:
    """Per calendar year of the world's ground truth: the share of its rows whose (company, period) move was
    reported by a news document crawled on or before the end of the cutoff's day (UTC)."""
    world_dir = Path(world_dir)
    paths = [world_dir / "ground_truth.parquet", world_dir / "news_index.parquet"]
    for p in paths:
        if not p.exists():
            raise PitlmError(f"{p} is missing; is {world_dir} a world built by `pitlm world`?")
    gt = pd.read_parquet(paths[0], columns=["Date", "SecuritiesCode", "period"])
    news = pd.read_parquet(paths[1], columns=["date", "kind", "SecuritiesCode", "period"])
    news = news[(news["kind"] == "news") & news["period"].notna()]
    end = pd.Timestamp(as_cutoff(cutoff) + timedelta(days=1), tz="UTC")
    crawled = pd.to_datetime(news["date"], utc=True) < end
    known = set(zip(news.loc[crawled, "SecuritiesCode"].astype(int), news.loc[crawled, "period"].astype(str),
                    strict=True))
    is_known = np.fromiter(((int(c), str(p)) in known for c, p in zip(gt["SecuritiesCode"], gt["period"], strict=True)),
                           dtype=bool, count=len(gt))
    year = pd.to_datetime(gt["Date"]).dt.year.to_numpy()
    return {int(y): float(is_known[year == y].mean()) for y in np.unique(year)}


def known_years(world_dir: str | Path, cutoff: date | str) -> set[int]:
    """Years whose every planted move is known to a member with this cutoff (known share 1)."""
    return {y for y, s in known_shares(world_dir, cutoff).items() if s >= 1.0}


def ground_truth_cells(members: Iterable[str], years: Iterable[int],
                       known_years_of: Mapping[str, Iterable[int] | Mapping[int, float]]) -> dict[str, dict[str, str]]:
    """`cells[member][str(year)]` = known | unknown | partial. `known_years_of[member]` is either the set of
    known years (others unknown) or `known_shares`' year -> share (1 known, 0 unknown, else partial)."""
    out: dict[str, dict[str, str]] = {}
    for m in members:
        if m not in known_years_of:
            raise PitlmError(f"no ground truth for family member '{m}'")
        k = known_years_of[m]
        out[m] = {}
        for y in years:
            y = int(y)
            if isinstance(k, Mapping):
                share = float(k.get(y, 0.0))
                out[m][str(y)] = "known" if share >= 1.0 else "unknown" if share <= 0.0 else "partial"
            else:
                out[m][str(y)] = "known" if y in {int(v) for v in k} else "unknown"
    return out


def staircase_check(matrix: dict, known: dict[str, dict[str, str]], detectable: Iterable[int] | None = None) -> dict:
    """Known and detectable cells that are not flagged (`missed`) and unknown cells that are (`false_flags`)."""
    detect = None if detectable is None else {int(y) for y in detectable}
    missed, false_flags, judged = [], [], 0
    for m, row in matrix["cells"].items():
        for y, cell in row.items():
            label = known.get(m, {}).get(y)
            if label is None:
                raise PitlmError(f"no ground truth for cell {m} {y}")
            if label == "known" and (detect is None or int(y) in detect):
                judged += 1
                if not cell["flagged"]:
                    missed.append(f"{m}_{y}")
            elif label == "unknown":
                judged += 1
                if cell["flagged"]:
                    false_flags.append(f"{m}_{y}")
    return {"ok": not missed and not false_flags, "missed": missed, "false_flags": false_flags, "judged": judged}


def staircase_ok(matrix: dict, known: dict[str, dict[str, str]], detectable: Iterable[int] | None = None) -> bool:
    """True when every known cell whose year is detectable (all years when None) is flagged and no unknown
    cell is flagged; partial cells are not judged."""
    return staircase_check(matrix, known, detectable)["ok"]


# ---- family specs (`pitlm eval --family NAME=...`) ----

_FAMILY_NAME = re.compile(r"[\w.-]+")


def member_name(family: str, cutoff: date) -> str:
    """The eval's model name of a family member: NAME-YYYY-MM-DD."""
    return f"{family}-{cutoff.isoformat()}"


def parse_family(item: str, vol=None) -> tuple[str, dict[str, tuple[str, date]]]:
    """'NAME=model:RUN' (every member of a chronological run, models/RUN/members/) or 'NAME=SPEC@YYYY-MM-DD,...'
    (SPEC: hf:ID for a hub id, model:RUN for a run's member, an HF id or a model dir) -> (NAME, {member name:
    (model spec, cutoff)}), members by cutoff. One-line errors for a bad item, a run without members, a
    repeated cutoff."""
    name, sep, body = item.partition("=")
    name = name.strip()
    if not sep or not name or not body.strip():
        raise PitlmError(f"--family expects NAME=model:RUN or NAME=SPEC@YYYY-MM-DD,..., got '{item}'")
    if not _FAMILY_NAME.fullmatch(name):
        raise PitlmError(f"family name '{name}' may use only letters, digits, '_', '.', '-'")
    body = body.strip()
    pairs: list[tuple[str, date]] = []
    if body.startswith("model:") and "@" not in body and "," not in body:
        run = body[len("model:"):]
        members = model_dir(vol or Volume.resolve(), run).list_members()
        if not members:
            raise PitlmError(f"--family {name}={body}: run {run} has no members (train it with "
                             "schedule=chronological on a nested corpus, or list SPEC@YYYY-MM-DD members)")
        pairs = [(f"model:{run}@{c.isoformat()}", c) for c, _ in members]
    else:
        for part in filter(None, (p.strip() for p in body.split(","))):
            if part.startswith("model:"):
                run, cutoff = split_member_spec(part[len("model:"):])
                if cutoff is None:
                    raise PitlmError(f"--family {name}: '{part}' needs its cutoff: model:RUN@YYYY-MM-DD")
                pairs.append((part, cutoff))
                continue
            spec, at, when = part.rpartition("@")
            if not at or not spec:
                raise PitlmError(f"--family {name}: member '{part}' needs its cutoff date: SPEC@YYYY-MM-DD")
            try:
                cutoff = date.fromisoformat(when)
            except ValueError:
                raise PitlmError(f"--family {name}: '{when}' in '{part}' is not a date (YYYY-MM-DD)") from None
            pairs.append((spec[len("hf:"):] if spec.startswith("hf:") else spec, cutoff))
    cutoffs = [c for _, c in pairs]
    repeated = sorted({c for c in cutoffs if cutoffs.count(c) > 1})
    if repeated:
        raise PitlmError(f"--family {name}: cutoff {repeated[0]} is given twice (one member per cutoff)")
    return name, {member_name(name, c): (spec, c) for spec, c in sorted(pairs, key=lambda p: p[1])}


def parse_families(items: Iterable[str], vol=None) -> dict[str, dict[str, tuple[str, date]]]:
    out: dict[str, dict[str, tuple[str, date]]] = {}
    for item in items:
        name, members = parse_family(item, vol)
        if name in out:
            raise PitlmError(f"family name '{name}' given twice")
        out[name] = members
    return out


# ---- one call for `pitlm eval --family` ----

def family_report(result: EvalResult, members: Mapping[str, date | str], years: Iterable[int] | None = None,
                  known_years_of: Mapping | None = None, detectable: Iterable[int] | None = None) -> dict:
    """Matrix, both slopes (the premium's only when the legacy protocol ran) and, with ground truth, the
    staircase check: the `family` entry of results.json."""
    matrix = knowledge_matrix(result, members, years)
    out: dict = {"matrix": matrix}
    names = [m["name"] for m in matrix["members"]]
    if len({m["cutoff"] for m in matrix["members"]}) >= 2:
        if all(SEED_PREMIUM in result.values[m] for m in names):
            out["slope"] = family_slope(result, members, SEED_PREMIUM)
        out["slope_calibrated"] = family_slope(result, members, calibrated_statistic(result))
    if known_years_of is not None:
        known = ground_truth_cells(names, matrix["years"], known_years_of)
        out["ground_truth"] = known
        out["staircase"] = staircase_check(matrix, known, detectable)
        out["staircase"]["detectable"] = None if detectable is None else sorted(int(y) for y in detectable)
    return out


def _num(v) -> str:
    return format_value(float("nan") if v is None else float(v))


def family_summary_lines(report: dict, prefix: str = "") -> list[str]:
    """The grep-able lines of a `family_report` (formats in the module doc); `prefix` (e.g. 'NAME.') goes before
    every key when an eval scores several families."""
    lines = [f"family: {report['name']}"] if "name" in report and not prefix else []
    for key, name in (("slope", "family_slope"), ("slope_calibrated", "family_slope_calibrated")):
        if key in report:
            s = report[key]
            lines += [f"{name}: {_num(s['estimate'])}", f"{name}_ci_lo: {_num(s['ci_lo'])}",
                      f"{name}_ci_hi: {_num(s['ci_hi'])}", f"{name}_skipped: {s['n_skipped']}"]
    matrix = report["matrix"]
    for m in matrix["members"]:
        for y in matrix["years"]:
            c = matrix["cells"][m["name"]][str(y)]
            flag = "flagged" if c["flagged"] else "-"
            lines.append(f"knowledge_{m['name']}_{y}: {_num(c['estimate'])} [{_num(c['ci_lo'])}, {_num(c['ci_hi'])}] {flag}")
    if "staircase" in report:
        st = report["staircase"]
        lines += [f"family_staircase_ok: {format_value(bool(st['ok']))}",
                  f"family_staircase_missed: {','.join(st['missed']) or 'none'}",
                  f"family_staircase_false_flags: {','.join(st['false_flags']) or 'none'}"]
    return [prefix + line for line in lines]
