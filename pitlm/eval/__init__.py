"""The leakage instrument: prompts, model specs, embeddings (cached on the volume), protocols, bootstrap,
calibration on synthetic worlds. CLI: `pitlm eval`, `pitlm calibrate`, `pitlm bench embed|stats`.

From Python: `pitlm.eval.evaluate(models, rows, ...)` (pitlm/eval/api.py) scores embeddings given as arrays or
model specs on your own rows and returns the `EvalResult`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pitlm.eval.api import evaluate


def __getattr__(name: str):  # loaded on first use: every `pitlm` command imports this package for its CLI
    if name == "evaluate":
        from pitlm.eval.api import evaluate  # noqa: PLC0415 - PEP 562: loaded on first use, not by every CLI start

        return evaluate
    raise AttributeError(f"module 'pitlm.eval' has no attribute '{name}'")

__all__ = ["evaluate"]
