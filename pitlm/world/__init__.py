"""The synthetic world (DESIGN.md §5): fictional companies, JPX-format prices with a planted per-(company, period)
component, a dated FineWeb-format corpus whose news reports each move after its period ends, and the ground truth.

    from pitlm.world import WorldConfig, generate_market, generate_corpus, build_world

The names load on first use (PEP 562): every `pitlm` command imports this package to register `pitlm world`, and
the generator pulls in scikit-learn (the oracle), which alone took 1.7 of the CLI's 4.3 s start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_HOMES = {"WorldConfig": "config", "WorldMarket": "prices", "build_world": "generate", "generate_corpus": "generate",
          "generate_market": "generate", "period_truth": "generate", "oracle_r2": "oracle"}
__all__ = ["WorldConfig", "WorldMarket", "build_world", "generate_corpus", "generate_market", "oracle_r2",
           "period_truth"]

if TYPE_CHECKING:
    from pitlm.world.config import WorldConfig
    from pitlm.world.generate import build_world, generate_corpus, generate_market, period_truth
    from pitlm.world.oracle import oracle_r2
    from pitlm.world.prices import WorldMarket


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'pitlm.world' has no attribute '{name}'")
    return getattr(importlib.import_module(f"pitlm.world.{_HOMES[name]}"), name)
