"""`pitlm eval` end to end on a tiny JPX-format market (through the JPX loader) with a tiny random HF model."""

import json
from pathlib import Path

import pytest
from test_eval_embed import save_tiny_model

FAST = ["--n-boot", "20", "--set", "protocol.rank_ic=false", "--set", "protocol.jackknife_groups=0"]
SEED_KEYS = ("r2_leakage_off", "r2_leakage_on", "leakage_premium")


@pytest.fixture(scope="module")
def jpx_dir(tmp_path_factory):
    """Kaggle-format stock_prices.csv + stock_list.csv of a 12-company synthetic world."""
    from pitlm.world import WorldConfig, generate_market

    d = tmp_path_factory.mktemp("jpx")
    market = generate_market(WorldConfig(seed=3, n_companies=12, n_sectors=3))
    market.prices.to_csv(d / "stock_prices.csv", index=False)
    market.stock_list.to_csv(d / "stock_list.csv", index=False)
    return d


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def market(cli, jpx_dir):
    code, out, err = cli("market", "jpx", "tiny", "--from", str(jpx_dir))
    assert code == 0, err
    return "tiny"


def lines(out: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


def test_eval_end_to_end_writes_results_and_the_seed_keys(cli, market, tiny_model, home):
    args = ["eval", "--market", market, "--model", f"tiny={tiny_model}", "--max-stocks", "12",
            "--dates-per-stock", "15", *FAST]
    code, out, err = cli(*args)
    assert code == 0, err
    got = lines(out)
    for key in SEED_KEYS + ("r2_purged", "r2_walk_forward", "net_leakage_premium", "control_leakage_premium",
                            "leakage_estimate", "leakage_flagged", "bootstrap_draws", "rows", "results_json"):
        assert key in got, key
        assert f"{key}_ci_lo" in got or key in ("leakage_flagged", "bootstrap_draws", "rows", "results_json")
    assert got["rows"] == "180" and got["bootstrap_draws"] == "20"
    res = json.loads(Path(got["results_json"]).read_text())
    assert {"config", "rows", "models", "control", "protocols", "summary", "versions"} <= set(res)
    assert res["rows"]["n"] == 180 and res["rows"]["stocks"] == 12
    assert set(res["models"]) == {"control", "tiny"}
    ctl, tiny = res["models"]["control"], res["models"]["tiny"]
    assert ctl["kind"] == "random-features" and tiny["kind"] == "hf" and len(tiny["fingerprint"]) == 64
    assert ctl["embedding_dim"] == tiny["embedding_dim"] == 64  # the control is matched to the model
    assert ctl["control_match"] == "spectrum" and ctl["control_rank"] == 64
    assert tiny["n_features"] == 64 + 5 and not tiny["cached"]
    assert res["config"]["protocol_resolved"]["n_boot"] == 20
    assert set(res["protocols"]["models"]) == {"control", "tiny"}
    assert res["summary"]["leakage_premium"] == pytest.approx(float(got["leakage_premium"]))

    code, out, err = cli(*args)  # re-analysis: embeddings come from the cache
    assert code == 0, err
    again = json.loads(Path(lines(out)["results_json"]).read_text())
    assert again["models"]["tiny"]["cached"] and again["models"]["control"]["cached"]
    assert again["summary"]["leakage_premium"] == res["summary"]["leakage_premium"]


def test_eval_with_base_prints_premium_reduction(cli, market, tiny_model, tmp_path):
    other = save_tiny_model(tmp_path / "other", seed=5)
    code, out, err = cli("eval", "--market", market, "--model", f"base={tiny_model}", "--model", f"arm={other}",
                         "--base", "base", "--protocol", "legacy", "--max-stocks", "12", "--dates-per-stock", "12",
                         "--template", "named", *FAST)
    assert code == 0, err
    got = lines(out)
    for key in SEED_KEYS:
        assert key in got and f"base_{key}" in got and f"control_{key}" in got
    assert "premium_reduction" in got and "premium_reduction_ci_lo" in got
    assert "r2_purged" not in got


@pytest.mark.parametrize("extra, message", [
    (["--model", "x=bogus:thing"], "unknown model spec"),
    (["--model", "x=control:random-features", "--base", "nope"], "--base nope is not one of the models"),
    (["--model", "control=control:random-features"], "reserved for the control"),
    (["--model", "x=control:random-features", "--max-stocks", "3"], "fewer than n_splits"),
    (["--model", "x=control:random-features", "--set", "protocol.test_start=2030-01-01",
      "--set", "protocol.train_end=2029-12-31"], "no rows on the chronological test side"),
    (["--model", "x=control:random-features", "--template", "nonsense"], "unknown prompt template"),
    (["--model", "x=control:random-features", "--protocol", "legacy,bogus"], "protocols"),
])
def test_eval_bad_input_is_one_error_line(cli, market, extra, message):
    code, out, err = cli("eval", "--market", market, "--dates-per-stock", "10", *FAST, *extra)
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err


@pytest.mark.parametrize("extra, message", [
    (["--max-stocks", "3"], "fewer than n_splits"),
    (["--set", "protocol.test_start=2030-01-01", "--set", "protocol.train_end=2029-12-31"],
     "no rows on the chronological test side"),
    (["--set", "protocol.train_end=2010-12-31", "--set", "protocol.test_start=2011-01-01"],
     "no rows on the chronological train side"),
    (["--protocol", "walk_forward", "--set", "protocol.first_test_year=2030"], "walk-forward has no test year"),
    (["--protocol", "purged", "--set", "protocol.n_time_blocks=1000"], "n_time_blocks=1000 must be between"),
])
def test_eval_protocol_mistakes_fail_before_any_embedding(cli, market, home, monkeypatch, extra, message):
    """What would stop the statistics is checked on the sampled rows first: one error line, and no embedding
    computed or cached."""
    import pitlm.eval.embed

    def no_embedding(*args, **kwargs):
        raise AssertionError("an embedding was computed")

    monkeypatch.setattr(pitlm.eval.embed, "embed", no_embedding)
    code, out, err = cli("eval", "--market", market, "--model", "x=control:random-features", "--dates-per-stock",
                         "10", *FAST, *extra)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and len(errors) == 1 and message in errors[0], err
    cache = home / "embeddings"
    assert not cache.exists() or not any(cache.iterdir())


def test_eval_shows_progress_per_draw_loop_and_ends_with_key_lines(cli, market, monkeypatch):
    """Every protocol step (model x fold layout) shows its draws done/total on stderr (plain lines with the ETA
    where stderr is not a terminal); stdout still ends with the grep-able key: value lines."""
    import pitlm.log

    monkeypatch.setenv("PITLM_NO_PROGRESS", "0")
    monkeypatch.setattr(pitlm.log, "PLAIN_PROGRESS_S", 0.0)
    code, out, err = cli("eval", "--market", market, "--model", "x=control:random-features", "--max-stocks", "12",
                         "--dates-per-stock", "12", *FAST)
    assert code == 0, err
    for step in ("legacy x", "legacy control", "purged x", "purged control", "walk_forward x", "walk_forward control"):
        assert f"{step}: 21/21 draws" in err, (step, err)
    assert "ETA" in err
    tail = out.strip().splitlines()[-3:]
    assert all(": " in line for line in tail) and tail[-1].startswith("results_json: ")
    assert "leakage_premium" in lines(out) and "r2_purged" in lines(out)


def test_eval_adapter_without_base_and_missing_market(cli, market, tiny_model, tmp_path):
    from test_eval_embed import make_adapter

    orphan, _ = make_adapter(tiny_model, tmp_path / "orphan", record_base=False)
    code, _, err = cli("eval", "--market", market, "--model", f"a=adapter:{orphan}")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and len(errors) == 1 and "names no base model" in errors[0]
    code, _, err = cli("eval", "--market", "no-such-market", "--model", "x=control:random-features")
    assert code != 0 and "no market panel 'no-such-market'" in err


def test_bench_embed_reports_throughput(cli):
    code, out, err = cli("bench", "embed", "--arch", "tiny-qwen3_5_moe", "--n-prompts", "8", "--batch", "4,8",
                         "--prompt-tokens", "16", "--device", "cpu")
    assert code == 0, err
    got = lines(out)
    assert float(got["prompts_per_s"]) > 0 and got["hidden_size"] == "64" and got["finite"] == "true"
    assert got["batch_size"] == "4" and float(got["prompts_per_s_batch8"]) > 0


def test_alpha_cv_default_survives_protocol_overrides(home):
    """`--n-boot` (protocol.n_boot) without a recipe must not drop the alpha-CV default of the calibrated protocols;
    an explicit protocol.alpha_cv=false still wins."""
    from pitlm.config import load_config
    from pitlm.eval.pipeline import EvalConfig, prepare_eval
    from pitlm.volume import Volume

    vol = Volume.resolve(home).ensure()
    cfg = load_config(EvalConfig, None, ["protocol.n_boot=7"], market="m",
                      models=["r=control:random-init:tiny-qwen3"])
    pcfg = prepare_eval(cfg, vol)[1]
    assert pcfg.alpha_cv is True and pcfg.n_boot == 7
    off = load_config(EvalConfig, None, ["protocol.n_boot=7", "protocol.alpha_cv=false"], market="m",
                      models=["r=control:random-init:tiny-qwen3"])
    assert prepare_eval(off, vol)[1].alpha_cv is False
