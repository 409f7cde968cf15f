"""Bring your own embeddings (`embeddings:PATH`): the layouts, alignment by (SecuritiesCode, Date), one-line
errors, the fingerprint, and `pitlm eval` end to end with a file model."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_eval_cli import FAST, jpx_dir, lines, market  # noqa: F401  (fixtures)

from pitlm.errors import PitlmError
from pitlm.eval.embfile import load_for_rows
from pitlm.eval.models import fingerprint, parse_spec

ROWS = pd.DataFrame({"SecuritiesCode": [1301, 1301, 7203], "Date": pd.to_datetime(["2021-01-04", "2021-01-05",
                                                                                   "2021-01-04"])})
KEYS = pd.DataFrame({"SecuritiesCode": [7203, 1301, 1301, 9999], "Date": ["2021-01-04", "2021-01-05",
                                                                         "2021-01-04", "2021-01-04"]})
X = np.arange(8, dtype=np.float32).reshape(4, 2)  # row i embeds KEYS row i
WANT = X[[2, 1, 0]]  # ROWS' order


def test_three_layouts_give_the_rows_embeddings_in_row_order(tmp_path):
    listed = tmp_path / "listed.parquet"
    KEYS.assign(embedding=list(X)).to_parquet(listed)
    cols = tmp_path / "cols.parquet"
    KEYS.assign(e0=X[:, 0], e1=X[:, 1], SecuritiesCode=KEYS["SecuritiesCode"].astype(str)).to_parquet(cols)
    npy = tmp_path / "emb.npy"
    np.save(npy, X)
    KEYS.to_csv(tmp_path / "emb.npy.keys.csv", index=False)
    for path in (listed, cols, npy):
        np.testing.assert_array_equal(load_for_rows(path, ROWS), WANT)
    spec = parse_spec(f"embeddings:{npy}")
    assert spec.kind == "embeddings" and not spec.needs_lm and not spec.is_control
    before = fingerprint(spec)
    KEYS.iloc[[1, 0, 2, 3]].to_csv(tmp_path / "emb.npy.keys.csv", index=False)  # same array, other keys
    assert fingerprint(spec) != before


@pytest.mark.parametrize("case, message", [
    ("missing", r"1 of 3 eval rows have no embedding, e.g. \(SecuritiesCode=7203, Date=2021-01-04\)"),
    ("duplicate", r"key \(SecuritiesCode=1301, Date=2021-01-05\) appears more than once"),
    ("nan", r"embedding of \(SecuritiesCode=1301, Date=2021-01-05\) has NaN"),
    ("count", r"has 4 rows but its keys file emb.npy.keys.csv has 3"),
    ("no_keys", r"needs a keys file"),
    ("columns", r"e1 is missing"),
])
def test_bad_files_are_one_line_errors(tmp_path, case, message):
    keys, emb = KEYS.copy(), X.copy()
    if case == "missing":
        keys = keys.iloc[1:]
        emb = emb[1:]
    elif case == "duplicate":
        keys.loc[3] = [1301, "2021-01-05"]
    elif case == "nan":
        emb[1, 0] = np.nan
    if case == "columns":
        path = tmp_path / "cols.parquet"
        keys.assign(e0=emb[:, 0], e2=emb[:, 1]).to_parquet(path)
    else:
        path = tmp_path / "emb.npy"
        np.save(path, emb)
        if case != "no_keys":
            (keys.iloc[:3] if case == "count" else keys).to_csv(tmp_path / "emb.npy.keys.csv", index=False)
    with pytest.raises(PitlmError, match=message):
        load_for_rows(parse_spec(f"embeddings:{path}").path, ROWS)


def test_eval_scores_an_embeddings_file(cli, market, jpx_dir, tmp_path):  # noqa: F811
    prices = pd.read_csv(jpx_dir / "stock_prices.csv")
    keys = prices[["SecuritiesCode", "Date"]]
    rng = np.random.default_rng(0)
    path = tmp_path / "api.parquet"
    keys.assign(embedding=list(rng.normal(size=(len(keys), 8)).astype(np.float32))).to_parquet(path)
    code, out, err = cli("eval", "--market", market, "--model", f"api=embeddings:{path}", "--max-stocks", "12",
                         "--dates-per-stock", "15", "--protocol", "legacy,walk_forward", *FAST)
    assert code == 0, err
    got = lines(out)
    for key in ("leakage_premium", "sharpe_walk_forward", "sharpe_walk_forward_nw_t", "net_sharpe_walk_forward",
                "control_sharpe_leakage_off"):
        assert key in got, key
    res = json.loads(Path(got["results_json"]).read_text())
    api = res["models"]["api"]
    assert api["kind"] == "embeddings" and api["embedding_dim"] == 8 and len(api["fingerprint"]) == 64
    assert res["models"]["control"]["embedding_dim"] == 8  # matched to the file's embeddings

    first = keys["SecuritiesCode"].min()
    keys = keys[keys["SecuritiesCode"] != first]  # one stock without embeddings
    keys.assign(embedding=list(np.ones((len(keys), 8), np.float32))).to_parquet(path)
    code, out, err = cli("eval", "--market", market, "--model", f"api=embeddings:{path}", "--max-stocks", "12",
                         "--dates-per-stock", "15", "--protocol", "legacy", *FAST)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and len(errors) == 1 and f"15 of 180 eval rows have no embedding, e.g. (SecuritiesCode={first}, " \
        in errors[0], err
