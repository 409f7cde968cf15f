"""Dates of Common Crawl dumps and documents, and the cutoff rule.

Naming: dump `CC-MAIN-YYYY-WW` is named after ISO week WW of YYYY (`iso_week_range`). The week is roughly the
*end* of the crawl: FineWeb's own table dates CC-MAIN-2021-43 to "October 2021" and its example document from that
dump was crawled on 2021-10-15, ten days before week 43 starts. So the crawl period of a dump (`crawl_period`) is:
  - for FineWeb v1's 96 dumps, the months its dataset card gives ("June 2017", "May/June 2020", ...), widened to
    include the named week where the two disagree (CC-MAIN-2014-23 is "July 2014" on the card);
  - for any other well-formed dump name, the ISO week widened by CRAWL_LEAD_DAYS before it.

The cutoff rule is per document: keep iff the document's own crawl `date` (ISO 8601, any offset, normalised to UTC)
is <= the end of the cutoff day in UTC. Dump periods are only used to skip dumps that cannot hold a keepable
document (`dump_may_precede`), so they must never start later than the real crawl: they err early.
"""

from __future__ import annotations

import calendar
import datetime as dt
import re
from dataclasses import dataclass

from pitlm.errors import PitlmError

UTC = dt.timezone.utc
DUMP_RE = re.compile(r"^CC-MAIN-(\d{4})-(\d{2})$")
# Crawls run up to ~3 weeks and end in the named week; 4 weeks keeps the start estimate early.
CRAWL_LEAD_DAYS = 28

# FineWeb v1 (v1.1.0): the 96 dumps with the crawl months its dataset card lists.
FINEWEB_DUMP_MONTHS: dict[str, str] = {
    "CC-MAIN-2013-20": "2013-05/2013-08", "CC-MAIN-2013-48": "2013-11/2014-01",  # "Summer 2013", "Winter 2013"
    "CC-MAIN-2014-10": "2014-03", "CC-MAIN-2014-15": "2014-04", "CC-MAIN-2014-23": "2014-07",
    "CC-MAIN-2014-35": "2014-08", "CC-MAIN-2014-41": "2014-09", "CC-MAIN-2014-42": "2014-10",
    "CC-MAIN-2014-49": "2014-11", "CC-MAIN-2014-52": "2014-12", "CC-MAIN-2015-06": "2015-01",
    "CC-MAIN-2015-11": "2015-02", "CC-MAIN-2015-14": "2015-03", "CC-MAIN-2015-18": "2015-04",
    "CC-MAIN-2015-22": "2015-05", "CC-MAIN-2015-27": "2015-06", "CC-MAIN-2015-32": "2015-07",
    "CC-MAIN-2015-35": "2015-08", "CC-MAIN-2015-40": "2015-09", "CC-MAIN-2015-48": "2015-11",
    "CC-MAIN-2016-07": "2016-02", "CC-MAIN-2016-18": "2016-04", "CC-MAIN-2016-22": "2016-05",
    "CC-MAIN-2016-26": "2016-06", "CC-MAIN-2016-30": "2016-07", "CC-MAIN-2016-36": "2016-08",
    "CC-MAIN-2016-40": "2016-09", "CC-MAIN-2016-44": "2016-10", "CC-MAIN-2016-50": "2016-12",
    "CC-MAIN-2017-04": "2017-01", "CC-MAIN-2017-09": "2017-02", "CC-MAIN-2017-13": "2017-03",
    "CC-MAIN-2017-17": "2017-04", "CC-MAIN-2017-22": "2017-05", "CC-MAIN-2017-26": "2017-06",
    "CC-MAIN-2017-30": "2017-07", "CC-MAIN-2017-34": "2017-08", "CC-MAIN-2017-39": "2017-09",
    "CC-MAIN-2017-43": "2017-10", "CC-MAIN-2017-47": "2017-11", "CC-MAIN-2017-51": "2017-12",
    "CC-MAIN-2018-05": "2018-01", "CC-MAIN-2018-09": "2018-02", "CC-MAIN-2018-13": "2018-03",
    "CC-MAIN-2018-17": "2018-04", "CC-MAIN-2018-22": "2018-05", "CC-MAIN-2018-26": "2018-06",
    "CC-MAIN-2018-30": "2018-07", "CC-MAIN-2018-34": "2018-08", "CC-MAIN-2018-39": "2018-09",
    "CC-MAIN-2018-43": "2018-10", "CC-MAIN-2018-47": "2018-11", "CC-MAIN-2018-51": "2018-12",
    "CC-MAIN-2019-04": "2019-01", "CC-MAIN-2019-09": "2019-02", "CC-MAIN-2019-13": "2019-03",
    "CC-MAIN-2019-18": "2019-04", "CC-MAIN-2019-22": "2019-05", "CC-MAIN-2019-26": "2019-06",
    "CC-MAIN-2019-30": "2019-07", "CC-MAIN-2019-35": "2019-08", "CC-MAIN-2019-39": "2019-09",
    "CC-MAIN-2019-43": "2019-10", "CC-MAIN-2019-47": "2019-11", "CC-MAIN-2019-51": "2019-12",
    "CC-MAIN-2020-05": "2020-01", "CC-MAIN-2020-10": "2020-02", "CC-MAIN-2020-16": "2020-03/2020-04",
    "CC-MAIN-2020-24": "2020-05/2020-06", "CC-MAIN-2020-29": "2020-07", "CC-MAIN-2020-34": "2020-08",
    "CC-MAIN-2020-40": "2020-09", "CC-MAIN-2020-45": "2020-10", "CC-MAIN-2020-50": "2020-11/2020-12",
    "CC-MAIN-2021-04": "2021-01", "CC-MAIN-2021-10": "2021-02/2021-03", "CC-MAIN-2021-17": "2021-04",
    "CC-MAIN-2021-21": "2021-05", "CC-MAIN-2021-25": "2021-06", "CC-MAIN-2021-31": "2021-07/2021-08",
    "CC-MAIN-2021-39": "2021-09", "CC-MAIN-2021-43": "2021-10", "CC-MAIN-2021-49": "2021-11/2021-12",
    "CC-MAIN-2022-05": "2022-01", "CC-MAIN-2022-21": "2022-05", "CC-MAIN-2022-27": "2022-06/2022-07",
    "CC-MAIN-2022-33": "2022-08", "CC-MAIN-2022-40": "2022-09/2022-10", "CC-MAIN-2022-49": "2022-11/2022-12",
    "CC-MAIN-2023-06": "2023-01/2023-02", "CC-MAIN-2023-14": "2023-03/2023-04", "CC-MAIN-2023-23": "2023-05/2023-06",
    "CC-MAIN-2023-40": "2023-09/2023-10", "CC-MAIN-2023-50": "2023-11/2023-12", "CC-MAIN-2024-10": "2024-02/2024-03",
    "CC-MAIN-2024-18": "2024-04",
}
FINEWEB_DUMPS: tuple[str, ...] = tuple(sorted(FINEWEB_DUMP_MONTHS))


@dataclass(frozen=True)
class Period:
    """A closed UTC interval [start, end]."""

    start: dt.datetime
    end: dt.datetime

    def contains(self, t: dt.datetime) -> bool:
        return self.start <= t <= self.end


def parse_dump(name: str) -> tuple[int, int]:
    """'CC-MAIN-2017-26' -> (2017, 26); one-line error for anything else."""
    m = DUMP_RE.match(str(name).strip())
    if m:
        year, week = int(m.group(1)), int(m.group(2))
        weeks_in_year = dt.date(year, 12, 28).isocalendar()[1]
        if 2008 <= year <= 2100 and 1 <= week <= weeks_in_year:
            return year, week
    raise PitlmError(f"unknown dump name '{name}': expected CC-MAIN-YYYY-WW with a valid ISO week, e.g. CC-MAIN-2017-26")


def is_dump_name(name: str) -> bool:
    try:
        parse_dump(name)
    except PitlmError:
        return False
    return True


def iso_week_range(name: str) -> Period:
    """The ISO week a dump is named after: Monday 00:00 to Sunday 23:59:59.999999 UTC."""
    year, week = parse_dump(name)
    monday = dt.datetime.combine(dt.date.fromisocalendar(year, week, 1), dt.time(), UTC)
    return Period(monday, monday + dt.timedelta(days=7) - dt.timedelta(microseconds=1))


def _month_range(spec: str) -> Period:
    first, _, last = spec.partition("/")
    last = last or first
    y0, m0 = map(int, first.split("-"))
    y1, m1 = map(int, last.split("-"))
    end_day = calendar.monthrange(y1, m1)[1]
    return Period(dt.datetime(y0, m0, 1, tzinfo=UTC), end_of_day(dt.date(y1, m1, end_day)))


def crawl_period(name: str) -> Period:
    """When a dump was crawled (see module doc): published months for FineWeb's dumps, else the widened ISO week."""
    week = iso_week_range(name)
    if name in FINEWEB_DUMP_MONTHS:  # the card's months, widened to the named week where they disagree (2014-23)
        months = _month_range(FINEWEB_DUMP_MONTHS[name])
        return Period(min(months.start, week.start), max(months.end, week.end))
    return Period(week.start - dt.timedelta(days=CRAWL_LEAD_DAYS), week.end)


def dump_for_date(t: dt.date | dt.datetime) -> str:
    """The nominal dump name for a crawl date (its ISO week), e.g. for synthetic documents."""
    if isinstance(t, dt.datetime):
        t = to_utc(t).date()
    year, week, _ = t.isocalendar()
    return f"CC-MAIN-{year}-{week:02d}"


def end_of_day(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time.max, UTC)


def parse_cutoff(value: str | dt.date) -> dt.date:
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value).strip())
    except ValueError:
        raise PitlmError(f"bad cutoff '{value}': expected a date YYYY-MM-DD, e.g. 2017-06-30") from None


def parse_cutoffs(value: str | list) -> list[dt.date]:
    """The cutoffs of a nested corpus: 'D1,D2,...' (strictly increasing dates) or 'yearly:Y0..Y1' (Dec 31 of each
    year Y0..Y1); a list of dates or date strings is checked the same way."""
    if isinstance(value, str) and value.strip().startswith("yearly:"):
        m = re.fullmatch(r"yearly:\s*(\d{4})\s*\.\.\s*(\d{4})\s*", value.strip())
        if not m or int(m.group(1)) > int(m.group(2)):
            raise PitlmError(f"bad cutoffs '{value}': expected yearly:Y0..Y1 with Y0 <= Y1, e.g. yearly:2017..2021")
        return [dt.date(y, 12, 31) for y in range(int(m.group(1)), int(m.group(2)) + 1)]
    items = [v for v in (value.split(",") if isinstance(value, str) else value)
             if not (isinstance(v, str) and not v.strip())]
    if not items:
        raise PitlmError(f"bad cutoffs '{value}': expected D1,D2,... (YYYY-MM-DD) or yearly:Y0..Y1")
    dates = [parse_cutoff(v) for v in items]
    for prev, cur in zip(dates, dates[1:], strict=False):
        if cur == prev:
            raise PitlmError(f"bad cutoffs: {cur} is listed twice; each cutoff starts a new period")
        if cur < prev:
            raise PitlmError(f"bad cutoffs: {cur} comes after {prev}; list the cutoffs in increasing order")
    return dates


def to_utc(t: dt.datetime) -> dt.datetime:
    # A timestamp without an offset is taken as UTC (Common Crawl's WARC-Date is UTC).
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def parse_doc_date(value) -> dt.datetime | None:
    """A document's `date` as an aware UTC datetime, or None when missing/unparseable."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return to_utc(value)
    if isinstance(value, dt.date):
        return dt.datetime.combine(value, dt.time(), UTC)
    text = str(value).strip()
    if not text:
        return None
    if text[-1] in "zZ":
        text = text[:-1] + "+00:00"
    try:
        return to_utc(dt.datetime.fromisoformat(text))
    except ValueError:
        return None


def dump_may_precede(name: str, cutoff: dt.date) -> bool:
    """False only when every document of the dump was crawled after the cutoff day (so it need not be read)."""
    return crawl_period(name).start <= end_of_day(cutoff)


def select_dumps(names: list[str], cutoff: dt.date) -> tuple[list[str], list[str]]:
    """Split dump names into (read, skipped) by crawl start vs the cutoff; both sorted chronologically."""
    ordered = sorted(set(names), key=parse_dump)
    read = [n for n in ordered if dump_may_precede(n, cutoff)]
    return read, [n for n in ordered if n not in read]


def format_utc(t: dt.datetime) -> str:
    return to_utc(t).strftime("%Y-%m-%dT%H:%M:%SZ")
