"""The world's clocks: the trading calendar, the periods whose moves are planted, and the monthly crawls that
date the corpus.

Crawls mimic Common Crawl: one crawl a month, during the ISO week that contains the 15th. A document crawled
in that week belongs to dump `CC-MAIN-<ISO year>-<ISO week>`, so every document's dump agrees with its date.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta

import pandas as pd

# Japan's fixed-date exchange holidays (month, day, first year, last year). Moving holidays (Coming of Age Day,
# Marine Day, ...) are ignored: the calendar only needs to look like JPX's, not match it.
FIXED_HOLIDAYS = [(1, 1, 0, 9999), (1, 2, 0, 9999), (1, 3, 0, 9999), (2, 11, 0, 9999), (2, 23, 2020, 9999),
                  (4, 29, 0, 9999), (5, 3, 0, 9999), (5, 4, 0, 9999), (5, 5, 0, 9999), (8, 11, 0, 9999),
                  (11, 3, 0, 9999), (11, 23, 0, 9999), (12, 23, 0, 2018), (12, 31, 0, 9999)]
EXTRA_DAYS = 2  # simulated beyond end_date so that Target (close t+1 -> t+2) exists on every row, as in Kaggle
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def trading_days(start: date, end: date, extra: int = 0) -> pd.DatetimeIndex:
    """Weekdays from `start` to `end` minus fixed holidays, plus `extra` trading days after `end`."""
    days = pd.bdate_range(start, end + timedelta(days=14 + 2 * extra))
    keep = [d for d in days if not any(d.month == m and d.day == dd and y0 <= d.year <= y1
                                       for m, dd, y0, y1 in FIXED_HOLIDAYS)]
    idx = pd.DatetimeIndex(keep)
    n_in = int((idx <= pd.Timestamp(end)).sum())
    return idx[: n_in + extra]


@dataclass(frozen=True)
class Period:
    label: str  # "2019H2", "2019Q3" or "2019Y"
    start: date
    end: date

    @property
    def year(self) -> int:
        return self.start.year

    @property
    def part(self) -> int:
        """1 or 2 for halves, 1..4 for quarters, 1 for a year."""
        return 1 if self.is_year else int(self.label[-1])

    @property
    def is_half(self) -> bool:
        return self.label[4] == "H"

    @property
    def is_year(self) -> bool:
        return self.label[4] == "Y"


def periods(start: date, end: date, kind: str) -> list[Period]:
    """Calendar years, half-years or quarters overlapping [start, end]."""
    months = {"year": 12, "half-year": 6, "quarter": 3}[kind]
    out = []
    for year in range(start.year, end.year + 1):
        for k in range(12 // months):
            p_start = date(year, 1 + k * months, 1)
            nxt = date(year + 1, 1, 1) if k == 12 // months - 1 else date(year, 1 + (k + 1) * months, 1)
            p_end = nxt - timedelta(days=1)
            if p_end >= start and p_start <= end:
                label = f"{year}Y" if months == 12 else f"{year}{'H' if months == 6 else 'Q'}{k + 1}"
                out.append(Period(label, p_start, p_end))
    return out


@dataclass(frozen=True)
class Crawl:
    start: datetime  # Monday 00:00:00 of the crawl week (UTC)

    @property
    def dump(self) -> str:
        year, week, _ = self.start.isocalendar()
        return f"CC-MAIN-{year}-{week:02d}"

    @property
    def end(self) -> datetime:
        return self.start + timedelta(days=7) - timedelta(seconds=1)


def crawls(first: date, last: date) -> list[Crawl]:
    """One crawl per month from `first`'s month to `last`'s month, in the ISO week containing the 15th."""
    out = []
    y, m = first.year, first.month
    while (y, m) <= (last.year, last.month):
        mid = date(y, m, 15)
        monday = mid - timedelta(days=mid.weekday())
        out.append(Crawl(datetime(monday.year, monday.month, monday.day)))
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return out


def iso_timestamp(t: datetime) -> str:
    """FineWeb's date format: 2017-07-03T12:00:00Z."""
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")
