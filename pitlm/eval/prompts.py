"""Prompts for the (stock, date) rows: the seed's template by default, named variants, or a custom format string.

A template is a `str.format` string over the row's fields: `date` (YYYY-MM-DD), `code`, `name`, `sector`, and the
numeric features (`ret_5d`, `ret_30d`, `vol_20d`, `log_close`, `log_volume`). The `anonymised` templates replace
both the company name and the code with one neutral token, so comparing `named` with `anonymised` measures how much
of a model's signal comes through the entity's identity (entity masking).
"""

from __future__ import annotations

import hashlib
import json
import string

import pandas as pd

from pitlm.errors import PitlmError

_NUMBERS = ("had recent 5-day log return {ret_5d:+.4f}, 30-day log return {ret_30d:+.4f}, "
            "20-day volatility {vol_20d:.4f}.")
TEMPLATES = {
    # DESIGN.md §4, exactly the seed's prompt.
    "seed": "On {date}, Japanese Tokyo Stock Exchange securities code {code} " + _NUMBERS,
    "named": "On {date}, {name} (code {code}) shares " + _NUMBERS,
    "anonymised": "On {date}, {entity} shares " + _NUMBERS,
    # No numbers: the prompt asks only what the model knows about this company on this date, ending where a news
    # sentence states the move ("... shares had risen"). Price features cannot leak through the text, so the
    # knowledge-free control has nothing to fit (the demo's template).
    "bare": "On {date}, {name} (code {code}) shares had",
    "bare-anonymised": "On {date}, {entity} shares had",
}
ANONYMOUS_ENTITY = "the company"
FIELDS = ("date", "code", "name", "sector", "entity", "ret_5d", "ret_30d", "vol_20d", "log_close", "log_volume")


def resolve_template(template: str) -> str:
    """A template name (seed, named, anonymised) or a custom format string using FIELDS."""
    fmt = TEMPLATES.get(template, template)
    if fmt is template and "{" not in template:
        raise PitlmError(f"unknown prompt template '{template}'; use one of {', '.join(TEMPLATES)} "
                         f"or a format string with fields like {{date}} {{code}} {{ret_5d:+.4f}}")
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None}
    except ValueError as e:
        raise PitlmError(f"prompt template is not a valid format string ({e}): {fmt!r}") from None
    unknown = sorted(n for n in names if n.split(".")[0].split("[")[0] not in FIELDS)
    if unknown:
        raise PitlmError(f"prompt template uses unknown field(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    return fmt


def build_prompts(rows: pd.DataFrame, template: str = "seed") -> list[str]:
    """One prompt per row (rows need Date, SecuritiesCode and the features the template uses)."""
    fmt = resolve_template(template)
    needed = {f for _, f, _, _ in string.Formatter().parse(fmt) if f}
    if "name" in needed and "Name" not in rows.columns:
        raise PitlmError("prompt template uses {name} but the panel has no Name column; use --template seed")
    dates = pd.to_datetime(rows["Date"]).dt.strftime("%Y-%m-%d").tolist()
    codes = rows["SecuritiesCode"].astype(int).tolist()
    cols = {c: rows[c].tolist() for c in ("ret_5d", "ret_30d", "vol_20d", "log_close", "log_volume") if c in rows}
    names = rows["Name"].astype(str).tolist() if "Name" in rows else [""] * len(rows)
    sectors = rows["Sector"].astype(str).tolist() if "Sector" in rows else [""] * len(rows)
    out = []
    for i in range(len(rows)):
        fields = {"date": dates[i], "code": codes[i], "name": names[i], "sector": sectors[i],
                  "entity": ANONYMOUS_ENTITY, **{c: v[i] for c, v in cols.items()}}
        try:
            out.append(fmt.format(**fields))
        except KeyError as e:
            raise PitlmError(f"prompt template needs {e} but the rows have no such column") from None
    return out


def prompts_hash(prompts: list[str]) -> str:
    """sha256 of the prompt list (order matters: embeddings are stored in prompt order)."""
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode("utf-8")).hexdigest()
