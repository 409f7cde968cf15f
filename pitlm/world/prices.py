"""The world's market: daily prices in the exact Kaggle JPX format, a JPX stock list, and the planted ground truth.

Daily log return of stock c on day t:
    r[c, t] = beta_c * market[t] + sector[s(c), t] + idio_scale_c * idio_vol * z[c, t] + planted[c, t]
planted[c, t] = leak_strength * sign[c, p] * magnitude[c, p] / n_days[p] on each trading day t of period p, so the
planted log move over a period is leak_strength * sign * magnitude; magnitude = planted_daily * n_days * U(0.5, 1.5).
Signs and magnitudes are drawn whatever the strength, so worlds that differ only in `leak_strength` share every
random number (and the same corpus): strength 0 is the exact null twin of a planted world.

Random streams are split by purpose (SeedSequence.spawn), so corpus knobs never change prices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pitlm.market.features import jpx_target
from pitlm.market.jpx import PRICE_COLUMNS, cumulative_factor, jpx_panel
from pitlm.world.companies import make_companies
from pitlm.world.config import WorldConfig
from pitlm.world.timeline import EXTRA_DAYS, periods, trading_days

SPLIT_FACTORS = [0.5, 5.0, 0.2, 0.5, 0.25]  # 2-for-1, 1-for-5 (reverse), 5-for-1, 2-for-1, 4-for-1
STREAMS = ("companies", "returns", "planted", "splits", "corpus")


def streams(seed: int) -> dict[str, np.random.Generator]:
    children = np.random.SeedSequence(seed).spawn(len(STREAMS))
    return {name: np.random.default_rng(s) for name, s in zip(STREAMS, children, strict=True)}


@dataclass
class WorldMarket:
    """prices: Kaggle JPX stock_prices columns; stock_list: JPX stock_list columns; ground_truth: one row per
    (Date, SecuritiesCode) with the planted component and its period's facts; companies: generator-side company
    facts (city, founding year, ...) that the corpus uses."""

    config: WorldConfig
    prices: pd.DataFrame
    stock_list: pd.DataFrame
    ground_truth: pd.DataFrame
    companies: pd.DataFrame

    def panel(self) -> pd.DataFrame:
        """The normalised panel, through the same JPX loader as real data."""
        return jpx_panel(self.prices, self.stock_list[["SecuritiesCode", "Name", "17SectorName"]]
                         .rename(columns={"17SectorName": "Sector"}), source="world prices")[0]


def period_truth(ground_truth: pd.DataFrame) -> pd.DataFrame:
    """One row per (company, period) from the daily ground truth."""
    cols = ["SecuritiesCode", "Name", "period", "period_start", "period_end", "period_days", "sign", "magnitude",
            "planted_total", "reported_pct"]
    return ground_truth[cols].drop_duplicates(["SecuritiesCode", "period"]).reset_index(drop=True)


def _planted(cfg: WorldConfig, comp: pd.DataFrame, days: pd.DatetimeIndex, rng: np.random.Generator):
    """Daily planted log returns (n, T) and the per-(company, period) table."""
    n, T = len(comp), len(days)
    planted = np.zeros((n, T))
    rows = []
    for p in periods(days[0].date(), days[-1].date(), cfg.period):
        in_p = (days >= pd.Timestamp(p.start)) & (days <= pd.Timestamp(p.end))
        n_days = int(in_p.sum())
        sign = rng.choice([-1, 1], size=n)
        magnitude = cfg.planted_daily * n_days * rng.uniform(0.5, 1.5, size=n)
        planted[:, in_p] = (cfg.leak_strength * sign * magnitude / n_days)[:, None]
        for i in range(n):
            pct = 100.0 * (np.exp(sign[i] * magnitude[i]) - 1.0)
            rows.append({"SecuritiesCode": comp["SecuritiesCode"].iloc[i], "Name": comp["Name"].iloc[i],
                         "period": p.label, "period_start": p.start, "period_end": p.end,
                         "period_days": n_days, "sign": int(sign[i]), "magnitude": float(magnitude[i]),
                         "planted_total": float(cfg.leak_strength * sign[i] * magnitude[i]),
                         "reported_pct": float(np.round(pct))})
    table = pd.DataFrame(rows)
    for col in ("period_start", "period_end"):
        table[col] = pd.to_datetime(table[col]).astype("datetime64[ns]")
    return planted, table


def _split_schedule(log_value: np.ndarray, n_splits: int, rng: np.random.Generator) -> np.ndarray:
    """(n, T) AdjustmentFactor: 1 except on the last pre-split day of each event (Kaggle placement). As on a
    real exchange, the dearest stock that day splits and the cheapest one does a reverse split."""
    n, T = log_value.shape
    af = np.ones((n, T))
    if T <= 60:  # a split day is drawn in [30, T - 30): none fits a shorter world
        return af
    for k in range(n_splits):
        day, factor = int(rng.integers(30, T - 30)), SPLIT_FACTORS[k % len(SPLIT_FACTORS)]
        level = log_value[:, day] + np.log(np.prod(af[:, :day], axis=1))  # raw price level that day
        af[int(np.argmax(level) if factor < 1 else np.argmin(level)), day] *= factor
    return af


def generate_market(cfg: WorldConfig) -> WorldMarket:
    """Prices, stock list and ground truth of the world `cfg` (no corpus). Cheap: ~0.1 s at the default size."""
    cfg.check()
    rng = streams(cfg.seed)
    comp = make_companies(cfg.n_companies, cfg.n_sectors, rng["companies"])
    days = trading_days(cfg.start_date, cfg.end_date, extra=EXTRA_DAYS)
    n, T = len(comp), len(days)

    r_rng = rng["returns"]
    market = r_rng.normal(0.0, cfg.market_vol, T)
    sector = r_rng.normal(0.0, cfg.sector_vol, (cfg.n_sectors, T))
    idio = r_rng.normal(0.0, 1.0, (n, T)) * (cfg.idio_vol * comp["idio_scale"].to_numpy())[:, None]
    noise = comp["beta"].to_numpy()[:, None] * market + sector[comp["sector_index"].to_numpy()] + idio
    planted, per_period = _planted(cfg, comp, days, rng["planted"])
    log_value = np.log(comp["price0"].to_numpy())[:, None] + np.cumsum(noise + planted, axis=1)

    # Raw (unadjusted) prices: a split effective on day k+1 scales every later raw price by its factor.
    af = _split_schedule(log_value, cfg.n_splits, rng["splits"])
    raw_scale = np.cumprod(np.concatenate([np.ones((n, 1)), af[:, :-1]], axis=1), axis=1)
    vol = (cfg.idio_vol * comp["idio_scale"].to_numpy())[:, None] + cfg.market_vol
    close = np.exp(log_value) * raw_scale
    open_ = np.exp(log_value - noise - planted + r_rng.normal(0.0, 0.3, (n, T)) * vol) * raw_scale
    high = np.maximum(open_, close) * np.exp(np.abs(r_rng.normal(0.0, 0.5, (n, T))) * vol)
    low = np.minimum(open_, close) * np.exp(-np.abs(r_rng.normal(0.0, 0.5, (n, T))) * vol)
    surprise = np.abs(noise) / np.sqrt(vol**2 + cfg.sector_vol**2)
    volume = comp["volume0"].to_numpy()[:, None] * np.exp(r_rng.normal(0.0, 0.35, (n, T)) + 0.25 * surprise) / raw_scale
    rnd = lambda a: np.maximum(np.round(a, 1), 0.1)  # noqa: E731 - JPX-style prices, 0.1 yen
    frame = pd.DataFrame({
        "Date": np.tile(days.to_numpy().astype("datetime64[ns]"), n), "SecuritiesCode": np.repeat(comp["SecuritiesCode"].to_numpy(), T),
        "Open": rnd(open_).ravel(), "High": rnd(high).ravel(), "Low": rnd(low).ravel(), "Close": rnd(close).ravel(),
        "Volume": np.maximum(np.round(volume / 100.0), 1).astype("int64").ravel() * 100,
        "AdjustmentFactor": af.ravel()})
    frame["High"] = frame[["High", "Open", "Close"]].max(axis=1)
    frame["Low"] = frame[["Low", "Open", "Close"]].min(axis=1)

    # Target exactly as the loader recomputes it: the same cumulative factor, then close t+1 -> t+2.
    caf = cumulative_factor(frame["SecuritiesCode"], frame["AdjustmentFactor"], "kaggle")
    frame["Target"] = (frame["Close"] * caf).groupby(frame["SecuritiesCode"], sort=False).transform(jpx_target)
    frame["ExpectedDividend"] = _expected_dividends(frame, comp, days)
    frame["SupervisionFlag"] = False

    gt = frame[["Date", "SecuritiesCode"]].copy()
    gt["planted_log_return"] = planted.ravel()
    gt["planted_target"] = gt.groupby("SecuritiesCode", sort=False)["planted_log_return"].shift(-2)
    gt["period"] = _period_labels(days, cfg.period, n)
    gt["planted_cum"] = gt.groupby(["SecuritiesCode", "period"], sort=False)["planted_log_return"].cumsum()
    gt = gt.merge(per_period, on=["SecuritiesCode", "period"], how="left", validate="many_to_one")

    in_calendar = frame["Date"] <= pd.Timestamp(cfg.end_date)
    frame, gt = frame[in_calendar], gt[in_calendar.to_numpy()]
    frame = frame.sort_values(["Date", "SecuritiesCode"], kind="mergesort").reset_index(drop=True)
    frame["RowId"] = frame["Date"].dt.strftime("%Y%m%d") + "_" + frame["SecuritiesCode"].astype(str)
    prices = frame[PRICE_COLUMNS]
    gt = gt.sort_values(["Date", "SecuritiesCode"], kind="mergesort").reset_index(drop=True)
    return WorldMarket(cfg, prices, _stock_list(comp, prices, cfg), gt, comp)


def _period_labels(days: pd.DatetimeIndex, kind: str, n: int) -> np.ndarray:
    if kind == "year":
        labels = days.year.astype(str) + "Y"
    elif kind == "half-year":
        labels = days.year.astype(str) + "H" + np.where(days.month <= 6, "1", "2")
    else:
        labels = days.year.astype(str) + "Q" + ((days.month - 1) // 3 + 1).astype(str)
    return np.tile(np.asarray(labels), n)


def _expected_dividends(frame: pd.DataFrame, comp: pd.DataFrame, days: pd.DatetimeIndex) -> pd.Series:
    """Half-yearly dividends: announced on the trading day two days before the last trading day of March and
    September (the Japanese record-date convention), 0.5 x yield x close; NaN elsewhere, as in Kaggle."""
    month_end = pd.Series(days).groupby([days.year, days.month]).max()
    record = {month_end[(y, m)] for y, m in month_end.index if m in (3, 9)}
    pos = {d: i for i, d in enumerate(days)}
    ex_days = {days[pos[d] - 2] for d in record if pos[d] >= 2}
    yld = frame["SecuritiesCode"].map(comp.set_index("SecuritiesCode")["dividend_yield"])
    on = frame["Date"].isin(ex_days) & (yld >= 0.005)
    return (0.5 * yld * frame["Close"]).round(1).where(on)


def _stock_list(comp: pd.DataFrame, prices: pd.DataFrame, cfg: WorldConfig) -> pd.DataFrame:
    last = prices.groupby("SecuritiesCode")["Close"].last()
    close = comp["SecuritiesCode"].map(last)
    cap = close * comp["issued_shares"]
    size_rank = cap.rank(ascending=False, method="first")
    size_code = np.where(size_rank <= len(comp) * 0.2, 4, np.where(size_rank <= len(comp) * 0.6, 6, 7))
    size_name = {4: "TOPIX Mid400", 6: "TOPIX Small 1", 7: "TOPIX Small 2"}
    stamp = int(pd.Timestamp(cfg.end_date).strftime("%Y%m%d"))
    return pd.DataFrame({
        "SecuritiesCode": comp["SecuritiesCode"], "EffectiveDate": stamp, "Name": comp["Name"],
        "Section/Products": "First Section (Domestic)", "NewMarketSegment": "Prime Market",
        "33SectorCode": comp["33SectorCode"], "33SectorName": comp["33SectorName"],
        "17SectorCode": comp["17SectorCode"], "17SectorName": comp["17SectorName"],
        "NewIndexSeriesSizeCode": size_code, "NewIndexSeriesSize": [size_name[c] for c in size_code],
        "TradeDate": stamp, "Close": close, "IssuedShares": comp["issued_shares"], "MarketCapitalization": cap,
        "Universe0": True})
