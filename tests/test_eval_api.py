"""`pitlm.eval.evaluate` from a notebook: the docstring example runs, and it equals the CLI's statistics."""

import doctest

import numpy as np
import pandas as pd
import pytest

import pitlm.eval.api
from pitlm.errors import PitlmError
from pitlm.eval import evaluate
from pitlm.eval.protocols.run import ProtocolConfig, evaluate_features


def test_docstring_example_runs():
    result = doctest.testmod(pitlm.eval.api, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 8 and result.failed == 0


def test_arrays_and_an_embeddings_file_give_the_same_statistics(tmp_path):
    rng = np.random.default_rng(1)
    dates = pd.bdate_range("2019-01-01", "2021-12-31")[::15]
    rows = pd.DataFrame([(d, c) for c in range(1000, 1012) for d in dates], columns=["Date", "SecuritiesCode"])
    rows["Target"] = rng.normal(0, 0.01, len(rows))
    X = rng.normal(size=(len(rows), 4)).astype(np.float32)
    path = tmp_path / "e.parquet"
    rows[["SecuritiesCode", "Date"]].assign(embedding=list(X)).iloc[::-1].to_parquet(path)  # any order
    cfg = ProtocolConfig(protocols=["purged"], n_boot=5, jackknife_groups=0)
    a = evaluate({"m": X}, rows, control=None, protocol=cfg)
    b = evaluate({"m": f"embeddings:{path}"}, rows, control=None, protocol=cfg)
    c = evaluate_features({"m": X.astype(np.float64)}, rows, cfg, control=None)
    for k in ("r2_purged", "sharpe_purged"):
        np.testing.assert_array_equal(a.values["m"][k], b.values["m"][k])
        np.testing.assert_array_equal(a.values["m"][k], c.values["m"][k])
    with pytest.raises(PitlmError, match=r"must be \(n_rows=636, d\)"):
        evaluate({"m": X[1:]}, rows, protocol=cfg)
    with pytest.raises(PitlmError, match="reserved for the control"):
        evaluate({"control": X}, rows, protocol=cfg)
