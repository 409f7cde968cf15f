"""The leakage instrument: prompts, model specs, embeddings (cached on the volume), protocols, bootstrap,
calibration on synthetic worlds. CLI: `pitlm eval`, `pitlm calibrate`, `pitlm bench embed|stats`.

From Python: `pitlm.eval.evaluate(models, rows, ...)` (pitlm/eval/api.py) scores embeddings given as arrays or
model specs on your own rows and returns the `EvalResult`."""

from pitlm.eval.api import evaluate

__all__ = ["evaluate"]
