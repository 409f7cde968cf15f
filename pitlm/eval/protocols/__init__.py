"""Leakage protocols as records: each protocol is one module (`legacy.py`, `purged.py`, `walk_forward.py`) that
defines `PROTOCOL = Protocol(...)`; `run.py` runs any of them on the same rows and bootstrap draws
(`pitlm.eval.protocols.run.evaluate_features`, DESIGN.md §4).

A `Protocol` says everything that differs between protocols:
- `layouts(calendar, cfg)`: its fold layouts by name (`PanelFolds`: folds on (stock fold, time cell) blocks);
  a `ValueError` becomes one `protocol <name>: ...` error line;
- `ic_groups(folds)`: sets of folds whose test rows are disjoint, each giving one out-of-fold prediction per tested
  row (the rank IC and the long-short series are computed per set; default: all folds, one set);
- `metrics(raw, layouts, panel, groups_ok)`: its per-draw statistics from each layout's fold sums (`raw[layout]`,
  see `run.run_layout`); `groups_ok` marks the draws with enough distinct stocks for the stock folds;
- `statistic`: its leakage statistic (a model is decided by `net_<statistic>`: calibrate, the leakage estimate),
  `reduction`: the name of its base - arm difference, `headline`: its statistics printed as summary lines;
- `preference`: rank of `statistic` as the calibrated leakage estimate when several protocols ran (lowest wins);
- `series`: (IC group, suffix) of the long-short series of its layout named like the protocol
  (`sharpe_<suffix>`, pitlm/eval/portfolio.py), or None;
- `fixed_alpha`: keep `cfg.alpha` even with `alpha_cv` (legacy: it must reproduce the seed exactly);
- `per_year`: prefix of its per-test-year statistic `<per_year><year>` (walk_forward: the knowledge matrix's cells).

A new protocol is one new module here with its `PROTOCOL`, listed in `PROTOCOLS` (the shipped protocols, run by
default, in summary order); `register` adds one from elsewhere (tests). The records load on first use: the CLI
imports this package for `--protocol`'s help without the statistics' libraries (nor pydantic: a config field
naming protocols is typed `run.ProtocolName`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pitlm.errors import PitlmError

# the shipped protocols: module pitlm.eval.protocols.<name> defines PROTOCOL named <name>
PROTOCOLS = ("legacy", "purged", "walk_forward")


def all_folds(folds) -> dict[str, list[int]]:
    """One out-of-fold set of every fold (each row is tested by one fold)."""
    return {"all": list(range(folds.n_folds))}


@dataclass(frozen=True)
class Protocol:
    """One leakage protocol (see the module doc for each field)."""

    name: str
    layouts: Callable[..., dict]  # (calendar, cfg) -> {layout name: PanelFolds}
    metrics: Callable[..., dict]  # (raw, layouts, panel, groups_ok) -> {statistic: (C,) array}
    statistic: str
    headline: tuple[str, ...] = ()
    reduction: str | None = None  # default: <statistic>_reduction
    preference: int = 100
    ic_groups: Callable[[Any], dict[str, list[int]]] = all_folds
    series: tuple[str, str] | None = None
    fixed_alpha: bool = False
    per_year: str | None = None

    @property
    def reduction_name(self) -> str:
        return self.reduction or f"{self.statistic}_reduction"


_registry: dict[str, Protocol] = {}


def registry() -> dict[str, Protocol]:
    """Every protocol by name: the shipped ones (loaded on first use, in PROTOCOLS order), then registered ones."""
    if not _registry:
        for name in PROTOCOLS:
            protocol = importlib.import_module(f"{__name__}.{name}").PROTOCOL
            assert protocol.name == name, f"module {name} defines protocol {protocol.name}"
            _registry[name] = protocol
    return _registry


def register(protocol: Protocol) -> Protocol:
    """Add (or replace) a protocol; `evaluate` and the configs accept its name from now on."""
    registry()[protocol.name] = protocol
    return protocol


def unregister(name: str) -> None:
    if name in PROTOCOLS:
        raise PitlmError(f"protocol '{name}' is shipped with pitlm and cannot be unregistered")
    registry().pop(name, None)


def get(name: str) -> Protocol:
    try:
        return registry()[name]
    except KeyError:
        raise PitlmError(f"unknown protocol '{name}'; known: {', '.join(registry())}") from None

