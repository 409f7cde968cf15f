"""WorldConfig: every knob of the synthetic world (DESIGN.md §5), validated with one-line errors.

Defaults are chosen so that the demo's science works on a 2-core CPU (measured, BENCHMARKS.md): 12 companies x
5 calendar years = 60 planted facts, each stated by 30 news documents with 6 dated "On <date>, <name> (code <code>)
shares had risen/fallen ..." sentences, little filler (0.1 per news document), ~0.72 M byte-BPE tokens in all. A
1.1 M-parameter model trained 1,600 steps x 32 x 64 tokens (~4 min) on it gets the direction of 99.7% of the facts
right from the prompt "On <date>, <name> (code <code>) shares had" (world seed 1). Half-year periods with the same
budget reached 93% / 74% / 77% on world seeds 0 / 1 / 2 (the date -> half-year -> fact lookup is harder for a tiny
model than date -> year), and the first default (30 companies, half-years, 10 repeats, 3 dated sentences, filler
0.5) 56%. The planted component is large enough that an oracle regression on it explains ~15-25% of the JPX
Target's variance on the demo's eval sample.
"""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import ConfigDict, Field

from pitlm.config import StageConfig
from pitlm.errors import ConfigError
from pitlm.world.timeline import trading_days

MIN_TRADING_DAYS = 40  # 30-day returns and 20-day volatility need 31 rows before a stock's first usable row
MAX_LOG_MOVE = 600.0  # exp(600) x the dearest start price is still a finite float, and so is every Target


class WorldConfig(StageConfig):
    model_config = ConfigDict(allow_inf_nan=False)  # merged with StageConfig's; inf/nan knobs are one-line errors

    seed: int = Field(0, ge=0, description="Seeds everything: companies, prices, planted moves, corpus "
                      "(numpy SeedSequence: a non-negative integer).")
    leak_strength: float = Field(1.0, ge=0.0, description="Scale of the planted per-(company, period) component "
                                 "in prices; 0 gives a null world. The corpus does not depend on it.")

    # Universe and calendar.
    n_companies: int = Field(12, ge=1, le=500)
    n_sectors: int = Field(6, ge=1, le=17, description="Sectors drawn from the 17 TOPIX-17 sectors.")
    start_date: date = date(2017, 1, 4)
    end_date: date = date(2021, 12, 3)
    period: Literal["year", "half-year", "quarter"] = "year"

    # Returns: market + sector + idiosyncratic + planted. All daily log-return standard deviations.
    market_vol: float = Field(0.006, ge=0.0)
    sector_vol: float = Field(0.004, ge=0.0)
    idio_vol: float = Field(0.008, ge=0.0, description="Per-stock idiosyncratic vol is this times U(0.75, 1.25).")
    planted_daily: float = Field(0.005, ge=0.0, description="Mean |daily planted drift| at strength 1; a period's "
                                 "move is drift x trading days x U(0.5, 1.5), signed at random.")
    n_splits: int = Field(4, ge=0, le=40, description="Stock splits / reverse splits with an AdjustmentFactor row "
                          "(at most 40: a stock that took every split would see its volumes overflow int64).")

    # Corpus.
    cutoff: date = Field(date(2017, 6, 30), description="The point-in-time cutoff the world is checked against: "
                         "no document dated on or before it mentions a later period's move.")
    news_repeats: int = Field(30, ge=1, description="News documents per (company, period) fact.")
    news_crawls: int = Field(2, ge=1, description="A fact's news appears in the first N monthly crawls after "
                             "its period ends (crawls are ~2 and ~6 weeks after a period ends).")
    dates_per_news: int = Field(6, ge=0, description="'On <date in period>, <name> (code <code>) shares had "
                                "risen...' sentences per news document (the eval prompt's surface form).")
    filler_ratio: float = Field(0.1, ge=0.0, description="Filler documents per news document, spread over all "
                                "crawls; filler never states a move.")
    history_docs: int = Field(1000, ge=0, description="Extra filler documents crawled on or before the cutoff, so "
                              "that a point-in-time model has text (company names and codes) to learn from.")
    corpus_end: date = Field(date(2022, 3, 31), description="Last crawl month (news of the last period lands "
                             "in January/February of the next year).")

    def check(self) -> WorldConfig:
        """Cross-field checks (one-line ConfigError); field ranges are checked by pydantic on construction."""
        if self.end_date <= self.start_date:
            raise ConfigError(f"end_date {self.end_date} must be after start_date {self.start_date}")
        if self.corpus_end < self.end_date:
            raise ConfigError(f"corpus_end {self.corpus_end} must not be before end_date {self.end_date}")
        if not self.start_date <= self.cutoff <= self.corpus_end:
            raise ConfigError(f"cutoff {self.cutoff} must lie between start_date and corpus_end")
        if self.n_sectors > self.n_companies:
            raise ConfigError(f"n_sectors ({self.n_sectors}) must not exceed n_companies ({self.n_companies})")
        n_days = len(trading_days(self.start_date, self.end_date))
        if n_days < MIN_TRADING_DAYS:
            raise ConfigError(f"start_date {self.start_date} .. end_date {self.end_date} holds {n_days} trading days; a "
                              f"world needs at least {MIN_TRADING_DAYS} (the 30-day features come before any usable row)")
        # the largest log move a price could make: every planted period the same sign, plus an 8-sigma noise path
        drift = self.leak_strength * self.planted_daily * 1.5 * n_days
        noise = 8.0 * n_days**0.5 * (1.3 * self.market_vol + self.sector_vol + 1.25 * self.idio_vol)
        if drift + noise > MAX_LOG_MOVE:
            raise ConfigError(f"leak_strength x planted_daily ({self.leak_strength * self.planted_daily:g}) and the "
                              f"vols (market {self.market_vol:g}, sector {self.sector_vol:g}, idio {self.idio_vol:g}) "
                              f"could move a log price by {drift + noise:.0f} over {n_days} days, beyond "
                              f"{MAX_LOG_MOVE:.0f} where prices overflow; lower them (they are daily log returns)")
        return self
