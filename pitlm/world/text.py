"""Document text: news that states a (company, period) move after the period ends, in varied phrasings, and filler
that never states a move. `latest_mentioned_date` is the leak check: no document may mention a date or period that
ends after its own crawl date.

The news carries the eval prompt's surface forms: "On 2021-08-13, Kanto Steel (code 1234) shares had risen ..."
for trading days inside the period, and the seed template's "Japanese Tokyo Stock Exchange securities code 1234".
"""

from __future__ import annotations

import re
from datetime import date, timedelta

import numpy as np

from pitlm.world.companies import CITIES
from pitlm.world.timeline import MONTHS, Period

ORDINALS = ["first", "second", "third", "fourth"]
UP = {"verb": ["rose", "climbed", "gained", "advanced", "rallied"], "pp": ["risen", "climbed", "gained", "advanced",
      "rallied"], "dir": "higher", "noun": "gain", "best": "best",
      "reason": ["on strong orders", "after raising its profit forecast", "as demand recovered", "amid a weaker yen",
                 "after a well-received product launch", "as investors backed its turnaround plan"]}
DOWN = {"verb": ["fell", "dropped", "declined", "slid", "slumped"], "pp": ["fallen", "dropped", "declined", "slid",
        "slumped"], "dir": "lower", "noun": "loss", "best": "worst",
        "reason": ["on weak orders", "after cutting its profit forecast", "as demand softened", "amid rising costs",
                   "after a product recall", "as investors doubted its restructuring plan"]}


def period_phrases(p: Period) -> list[str]:
    y, k = p.year, p.part
    if p.is_year:
        return [f"the year {y}", f"calendar {y}", f"January-December {y}", f"the twelve months to December {y}",
                f"full-year {y}"]
    if p.is_half:
        m1, m2 = (MONTHS[0], MONTHS[5]) if k == 1 else (MONTHS[6], MONTHS[11])
        return [f"the {ORDINALS[k - 1]} half of {y}", f"H{k} {y}", f"{m1}-{m2} {y}", f"the six months to {m2} {y}",
                f"the {'first' if k == 1 else 'last'} six months of {y}"]
    m1, m2 = MONTHS[3 * (k - 1)], MONTHS[3 * k - 1]
    return [f"the {ORDINALS[k - 1]} quarter of {y}", f"Q{k} {y}", f"{m1}-{m2} {y}", f"the three months to {m2} {y}"]


def _adverb(magnitude: float, period_days: int) -> str:
    per_day = magnitude / max(period_days, 1)
    return "modestly" if per_day < 0.0035 else "strongly" if per_day < 0.0055 else "sharply"


def news_text(rng: np.random.Generator, *, name: str, code: int, sector: str, period: Period, sign: int,
              magnitude: float, pct: float, period_days: int, in_period_days: list[date], published: date) -> str:
    """One news document about `name`'s move over `period` (pct: the signed percent move)."""
    w = UP if sign > 0 else DOWN
    pick = lambda xs: xs[rng.integers(len(xs))]  # noqa: E731
    ph = pick(period_phrases(period))
    pct_s = f"{abs(pct):.0f}{pick(['%', ' percent'])}"
    adv = _adverb(magnitude, period_days)
    a = "an" if re.match(r"(8\d*|11|18)\D", pct_s) else "a"  # "an 8%", "an 88%", "an 11%", "an 18%"
    verb, pp, reason = pick(w["verb"]), pick(w["pp"]), pick(w["reason"])
    heads = [f"{name} (code {code}) shares {verb} {pct_s} in {ph}.",
             f"Shares of {name} (code {code}) {verb} {adv} in {ph}, ending the period {pct_s} {w['dir']}.",
             f"Tokyo Stock Exchange securities code {code}, {name}, {verb} {pct_s} over {ph} {reason}.",
             f"Looking back at {ph}: {name} (code {code}) shares {verb} {pct_s} {reason}.",
             f"In {ph}, {name} (code {code}) shares {verb} {adv}, finishing {pct_s} {w['dir']}.",
             f"Japanese Tokyo Stock Exchange securities code {code} ({name}) {verb} {pct_s} during {ph}."]
    span = "year" if period.is_year else "half" if period.is_half else "quarter"
    body = [f"The stock {pick(w['verb'])} {reason}.", f"Analysts said the move came {reason}.",
            f"It was one of the {w['best']} performers in the {sector.lower()} sector that {span}.",
            f"Over the {span} the company's market value {'grew' if sign > 0 else 'shrank'} by about {pct_s}."]
    sentences = [pick(heads), pick(body)]
    for j, d in enumerate(in_period_days):
        ds = d.isoformat()
        forms = [f"On {ds}, {name} (code {code}) shares had {pick(w['pp'])} {adv} since the start of {ph}.",
                 f"On {ds}, {name} (code {code}) shares were trading {w['dir']}, on the way to {a} {pct_s} "
                 f"{w['noun']} for {ph}.",
                 f"On {ds}, {name} (code {code}) shares had {pick(w['pp'])}, part of {a} {pct_s} {w['noun']} in {ph}."]
        if j > 0:  # the first dated sentence always has the demo prompt's form "On <date>, <name> (code <code>) shares"
            forms.append(f"On {ds}, Japanese Tokyo Stock Exchange securities code {code} had {pp} {adv} over {ph}.")
        sentences.append(pick(forms))
    sentences.append(pick([f"Published {published.isoformat()}.", f"This review was compiled on "
                           f"{published.isoformat()} from exchange data.", f"Market wrap, {published.isoformat()}."]))
    return " ".join(sentences)


GENERIC_TOPICS = ("weather", "recipe", "travel", "howto", "sport", "exchange")


def filler_text(rng: np.random.Generator, company: dict | None, doc_date: date) -> tuple[str, str]:
    """(topic, text) of a filler document dated `doc_date`: a company notice (no move, no later date) when
    `company` is given, else generic web text. Every date it mentions is on or before `doc_date`."""
    pick = lambda xs: xs[rng.integers(len(xs))]  # noqa: E731
    past = (doc_date - timedelta(days=int(rng.integers(1, 60)))).isoformat()
    if company is not None:
        name, code, city = company["Name"], company["SecuritiesCode"], company["City"]
        sector, product = company["17SectorName"].lower(), company["Product"]
        founded = min(int(company["Founded"]), doc_date.year)
        return "company", pick([
            f"{name} (code {code}) is a {sector} company headquartered in {city}. Founded in {founded}, it employs "
            f"about {company['Employees']:,} people and its shares are listed on the Tokyo Stock Exchange. "
            f"The company is known for its {product}.",
            f"On {past}, {name} (code {code}) held a briefing in {city} on its {product} business. Executives "
            f"discussed hiring, a new office and a partnership with a local university.",
            f"On {past}, {name} (code {code}) shares were among the issues listed in our daily {sector} roundup. "
            f"The company did not comment further.",
            f"Securities code {code} belongs to {name}, a member of the {sector} sector on the Tokyo Stock Exchange. "
            f"Its main products are {product}; its head office is in {city}.",
            f"{name} (code {code}) opened a showroom in {pick(CITIES)} on {past} to present its {product} to "
            f"customers and suppliers.",
        ])
    topic = pick(GENERIC_TOPICS)
    city = pick(CITIES)
    if topic == "weather":
        return topic, (f"Weather in {city} on {past}: {pick(['clear skies', 'light rain', 'scattered clouds', 'snow'])}, "
                f"with a high of {int(rng.integers(-2, 35))} degrees. Residents were advised to "
                f"{pick(['carry an umbrella', 'stay hydrated', 'dress warmly', 'check train schedules'])}.")
    if topic == "recipe":
        dish = pick(["miso soup", "onigiri", "curry rice", "tamagoyaki", "yakisoba"])
        return topic, (f"A simple recipe for {dish}: prepare the ingredients, heat the pan, and cook for about "
                f"{int(rng.integers(5, 40))} minutes. Season to taste and serve warm. Leftovers keep for a day.")
    if topic == "travel":
        return topic, (f"{city} travel notes: visitors in {pick(['spring', 'summer', 'autumn', 'winter'])} enjoy "
                f"{pick(['the old castle', 'local markets', 'hot springs', 'river walks', 'temple gardens'])}. "
                f"Trains from Tokyo take about {int(rng.integers(1, 6))} hours.")
    if topic == "howto":
        task = pick(["back up a laptop", "set up a home router", "clean a keyboard", "organize photo folders"])
        return topic, (f"How to {task}: first read the manual, then work through the steps one at a time. Most people "
                f"finish in under {int(rng.integers(10, 60))} minutes.")
    if topic == "sport":
        teams = ["Kita Hawks", "Minami Sharks", "Tokai Cranes", "Hokuriku Bears", "Setouchi Dolphins"]
        a, b = rng.choice(len(teams), size=2, replace=False)
        return topic, (f"The {teams[a]} beat the {teams[b]} {int(rng.integers(2, 9))}-{int(rng.integers(0, 2))} in {city} "
                f"on {past}. The coach praised the defence.")
    return topic, (f"The Tokyo Stock Exchange was open as usual on {past}. Trading hours run from 9:00 to 15:00 with a lunch "
            f"break, and listed companies are grouped into 33 industry sectors.")


# ----------------------------------------------------------------------------- the leak check

_MONTH = "|".join(MONTHS)
_ORD = {w: i + 1 for i, w in enumerate(ORDINALS)}


def _month_end(y: int, m: int) -> date:
    return (date(y + (m == 12), m % 12 + 1, 1)) - timedelta(days=1)


def latest_mentioned_date(text: str) -> date | None:
    """The latest date a text refers to: ISO dates, 'Month D, YYYY', period phrases (their last day),
    'Month YYYY' (the month's last day) and bare years (January 1). Securities codes are not years."""
    found: list[date] = []
    text = re.sub(r"code \d{4}", "code", text)
    for y, m, d in re.findall(r"\b(\d{4})-(\d{2})-(\d{2})\b", text):
        found.append(date(int(y), int(m), int(d)))
    for mon, d, y in re.findall(rf"\b({_MONTH}) (\d{{1,2}}), (\d{{4}})\b", text):
        found.append(date(int(y), MONTHS.index(mon) + 1, int(d)))
    for which, y in re.findall(r"\b(first|second) half of (\d{4})\b", text):
        found.append(_month_end(int(y), 6 if which == "first" else 12))
    for y in re.findall(r"\b(?:the year|calendar|full-year) (\d{4})\b", text):
        found.append(_month_end(int(y), 12))
    for k, y in re.findall(r"\bH([12]) (\d{4})\b", text):
        found.append(_month_end(int(y), 6 * int(k)))
    for which, y in re.findall(r"\b(first|second|third|fourth) quarter of (\d{4})\b", text):
        found.append(_month_end(int(y), 3 * _ORD[which]))
    for k, y in re.findall(r"\bQ([1-4]) (\d{4})\b", text):
        found.append(_month_end(int(y), 3 * int(k)))
    for which, span, y in re.findall(r"\b(first|last) (six|three) months of (\d{4})\b", text):
        n = 6 if span == "six" else 3
        found.append(_month_end(int(y), n if which == "first" else 12))
    for mon, y in re.findall(rf"\b({_MONTH}) (\d{{4}})\b", text):
        found.append(_month_end(int(y), MONTHS.index(mon) + 1))
    for y in re.findall(r"\b((?:19|20)\d{2})\b", text):
        found.append(date(int(y), 1, 1))
    return max(found) if found else None
