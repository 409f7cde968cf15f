"""Embeddings: last non-pad token, no lm_head, cache hits/misses, the random-feature control, model specs."""

import json

import numpy as np
import pytest
import torch

from pitlm.errors import PitlmError
from pitlm.eval import embed as embed_mod
from pitlm.eval.embed import EmbedOptions, embed, embed_prompts, embed_token_ids, random_features, tokenize
from pitlm.eval.models import backbone_of, fingerprint, load_causal_lm, load_tokenizer, parse_named_specs, parse_spec
from pitlm.volume import Volume

PROMPTS = ["On 2020-01-06, Japanese Tokyo Stock Exchange securities code 1301 had recent 5-day log return +0.0100.",
           "a", "On 2021-03-01, code 7203", "hello world, a prompt of middling length", "On 2021-03-01, code 7204"]


def save_tiny_model(path, seed=0, arch="tiny-qwen3"):
    from transformers import AutoModelForCausalLM

    from pitlm.archs import arch_config, byte_tokenizer

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(arch_config(arch)).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def manual_last_states(model, tokenizer, prompts):
    """One prompt at a time, no padding: the definition of the embedding."""
    rows = []
    with torch.no_grad():
        for ids in tokenize(tokenizer, prompts, 256):
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            rows.append(out.hidden_states[-1][0, -1].float().numpy())
    return np.stack(rows)


@pytest.mark.parametrize("arch", ["tiny-qwen3", "tiny-qwen3_5_moe"])
def test_last_non_pad_token_matches_unpadded_forward(arch):
    spec = parse_spec(f"control:random-init:{arch}")
    tok, model = load_tokenizer(spec), load_causal_lm(spec, "cpu", torch.float32)
    ref = manual_last_states(model, tok, PROMPTS)
    seqs = tokenize(tok, PROMPTS, 256)
    assert len({len(s) for s in seqs}) > 2  # really padded
    for side in ("right", "left"):
        for batch in (2, len(PROMPTS)):  # sorting + batching must not change any row
            X = embed_token_ids(backbone_of(model), seqs, batch, "cpu", 0, side)
            np.testing.assert_allclose(X, ref, atol=2e-5, rtol=1e-4)


def test_embed_never_computes_lm_head_and_cache_avoids_recompute(tiny_dir, tmp_path, monkeypatch):
    vol = Volume(tmp_path / "home").ensure()
    calls = {"lm_head": 0, "backbone": 0}
    real = embed_mod.load_causal_lm

    def spy(spec, device, dtype):
        m = real(spec, device, dtype)
        m.lm_head.register_forward_hook(lambda *a: calls.__setitem__("lm_head", calls["lm_head"] + 1))
        backbone_of(m).register_forward_hook(lambda *a: calls.__setitem__("backbone", calls["backbone"] + 1))
        return m

    monkeypatch.setattr(embed_mod, "load_causal_lm", spy)
    opts = EmbedOptions(batch_size=2, device="cpu")
    first = embed(str(tiny_dir), PROMPTS, vol, opts)
    assert calls == {"lm_head": 0, "backbone": 3} and not first.cached
    tok = load_tokenizer(parse_spec(str(tiny_dir)))
    ref = manual_last_states(real(parse_spec(str(tiny_dir)), "cpu", torch.float32), tok, PROMPTS)
    np.testing.assert_allclose(first.X, ref, atol=2e-5, rtol=1e-4)

    again = embed(str(tiny_dir), PROMPTS, vol, opts)  # cache hit: no forward at all
    assert again.cached and calls["backbone"] == 3 and again.key == first.key
    np.testing.assert_array_equal(again.X, first.X)
    meta = json.loads((vol.path("embeddings", first.key, "meta.json")).read_text())
    assert meta["n_prompts"] == len(PROMPTS) and meta["shape"] == [len(PROMPTS), 64]

    other_prompts = embed(str(tiny_dir), PROMPTS[:-1] + ["different"], vol, opts)
    assert not other_prompts.cached and other_prompts.key != first.key and calls["backbone"] == 6

    other_model = save_tiny_model(tmp_path / "m2", seed=1)
    diff = embed(str(other_model), PROMPTS, vol, opts)
    assert not diff.cached and diff.fingerprint != first.fingerprint
    assert not np.allclose(diff.X, first.X)

    assert embed(str(tiny_dir), PROMPTS, vol, EmbedOptions(device="cpu", reembed=True)).cached is False


def test_random_features_control_is_deterministic_and_prompt_dependent(tmp_path):
    a = random_features(PROMPTS, dim=32, seed=0)
    assert a.shape == (len(PROMPTS), 32) and a.dtype == np.float32 and np.all(np.abs(a) < 1)
    np.testing.assert_array_equal(a, random_features(list(PROMPTS), dim=32, seed=0))
    assert not np.allclose(a[2], a[4])  # prompts differing in one character differ
    assert not np.allclose(a, random_features(PROMPTS, dim=32, seed=1))
    vol = Volume(tmp_path / "home").ensure()
    X = embed_prompts("control:random-features:dim=32", PROMPTS, vol)
    np.testing.assert_array_equal(X, a)
    spec = parse_spec("control:random-features:dim=32,seed=3")
    assert spec.options["dim"] == 32 and spec.options["seed"] == 3
    assert fingerprint(spec) != fingerprint(parse_spec("control:random-features:dim=32"))


def test_random_init_control_is_seeded(tmp_path):
    vol = Volume(tmp_path / "home").ensure()
    a = embed_prompts("control:random-init:tiny-qwen3", PROMPTS[:2], vol, device="cpu")
    b = embed(parse_spec("control:random-init:tiny-qwen3", seed=0), PROMPTS[:2], vol, EmbedOptions(reembed=True)).X
    c = embed(parse_spec("control:random-init:tiny-qwen3", seed=1), PROMPTS[:2], vol).X
    np.testing.assert_allclose(a, b)
    assert not np.allclose(a, c)


def make_adapter(base_dir, path, record_base=True):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(path)
    cfg_path = path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base_dir) if record_base else None
    cfg_path.write_text(json.dumps(cfg))
    return path, peft.merge_and_unload()


def test_adapter_specs_with_and_without_base(tiny_dir, tmp_path):
    vol = Volume(tmp_path / "home").ensure()
    adapter, merged = make_adapter(tiny_dir, tmp_path / "ad")
    spec = parse_spec(f"adapter:{adapter}", vol)
    assert spec.kind == "adapter" and spec.base.path == str(tiny_dir.resolve())
    assert parse_spec(str(adapter), vol).kind == "adapter"  # a bare adapter dir is recognised
    X = embed(spec, PROMPTS, vol, EmbedOptions(device="cpu")).X
    tok = load_tokenizer(parse_spec(str(tiny_dir)))
    np.testing.assert_allclose(X, manual_last_states(merged, tok, PROMPTS), atol=2e-5, rtol=1e-4)
    base_X = embed(str(tiny_dir), PROMPTS, vol, EmbedOptions(device="cpu")).X
    assert not np.allclose(X, base_X)  # the adapter changes the embedding

    orphan, _ = make_adapter(tiny_dir, tmp_path / "orphan", record_base=False)
    with pytest.raises(PitlmError, match="names no base model") as e:
        parse_spec(f"adapter:{orphan}", vol)
    assert "\n" not in str(e.value)
    explicit = parse_spec(f"adapter:{orphan}@{tiny_dir}", vol)
    assert explicit.base.path == str(tiny_dir.resolve())
    assert fingerprint(explicit) != fingerprint(parse_spec(str(tiny_dir)))


def test_model_run_spec_prefers_merged_for_adapters(tiny_dir, tmp_path):
    import shutil

    vol = Volume(tmp_path / "home").ensure()
    shutil.copytree(tiny_dir, vol.path("models", "full1", "final"))
    assert parse_spec("model:full1", vol).path == str(vol.path("models", "full1", "final"))
    make_adapter(tiny_dir, vol.path("models", "lora1", "final"))
    assert parse_spec("model:lora1", vol).kind == "adapter"
    shutil.copytree(tiny_dir, vol.path("models", "lora1", "merged"))
    s = parse_spec("model:lora1", vol)
    assert s.kind == "hf" and s.path.endswith("merged")


@pytest.mark.parametrize("bad, match", [
    ("nonsense:thing", "unknown model spec"),
    ("./no/such/dir/", "unknown model spec"),
    ("control:random-init:", "needs an arch"),
    ("control:random-init:not_an_arch", "unknown arch"),
    ("control:random-features:dims=3", "unknown option"),
    ("control:random-features:dim=wide", "must be a number"),
    ("oracle:planted", "knowledge model of `pitlm calibrate`"),
    ("model:no-such-run", "no trained model"),
    ("adapter:/no/such/adapter", "not a peft adapter"),
])
def test_bad_specs_give_one_line_errors(bad, match, tmp_path):
    with pytest.raises(PitlmError, match=match) as e:
        parse_spec(bad, Volume(tmp_path / "home").ensure())
    assert "\n" not in str(e.value)
    if match == "unknown model spec":
        assert "control:random-features" in str(e.value) and "adapter:PATH" in str(e.value)


def test_named_specs():
    specs = parse_named_specs(["a=control:random-features", "b=control:random-init:tiny-qwen3"])
    assert list(specs) == ["a", "b"] and specs["b"].kind == "random-init"
    for bad in (["a"], ["a=control:random-features", "a=control:random-features"], ["a b=x/y"]):
        with pytest.raises(PitlmError):
            parse_named_specs(bad)


def test_prompt_templates():
    import pandas as pd

    from pitlm.eval.prompts import build_prompts, prompts_hash

    rows = pd.DataFrame({"Date": pd.to_datetime(["2021-03-01"]), "SecuritiesCode": [7203], "Name": ["Acme Corp"],
                         "Sector": ["Tech"], "ret_5d": [0.01234], "ret_30d": [-0.05], "vol_20d": [0.0211],
                         "log_close": [7.0], "log_volume": [12.0]})
    assert build_prompts(rows) == ["On 2021-03-01, Japanese Tokyo Stock Exchange securities code 7203 had recent "
                                   "5-day log return +0.0123, 30-day log return -0.0500, 20-day volatility 0.0211."]
    named = build_prompts(rows, "named")[0]
    assert named.startswith("On 2021-03-01, Acme Corp (code 7203) shares had recent")
    anon = build_prompts(rows, "anonymised")[0]
    assert "Acme" not in anon and "7203" not in anon and anon.startswith("On 2021-03-01, the company shares")
    assert build_prompts(rows, "bare") == ["On 2021-03-01, Acme Corp (code 7203) shares had"]  # the demo's: no numbers
    assert build_prompts(rows, "bare-anonymised") == ["On 2021-03-01, the company shares had"]
    assert build_prompts(rows, "{name} in {sector} on {date}") == ["Acme Corp in Tech on 2021-03-01"]
    assert prompts_hash(["a", "b"]) != prompts_hash(["b", "a"])
    for bad, match in (("nonsense", "unknown prompt template"), ("{price}", "unknown field"), ("{date", "valid")):
        with pytest.raises(PitlmError, match=match):
            build_prompts(rows, bad)
    with pytest.raises(PitlmError, match="no Name column"):
        build_prompts(rows.drop(columns="Name"), "named")


def test_unreachable_hf_id_is_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = parse_spec("no-such-org/no-such-model")
    assert spec.kind == "hf"
    with pytest.raises(PitlmError, match="cannot fetch model 'no-such-org/no-such-model'") as e:
        fingerprint(spec)
    assert "\n" not in str(e.value)


def test_match_control_gives_the_reference_spectrum_or_variance():
    from pitlm.eval.pipeline import match_control

    rng = np.random.default_rng(0)
    control = rng.standard_normal((200, 16)) @ rng.standard_normal((16, 16))
    reference = rng.standard_normal((200, 16)) * np.geomspace(100, 0.01, 16)  # anisotropic, like LM states
    X, info = match_control(control, reference, "spectrum")
    sv = lambda A: np.linalg.svd(A - A.mean(0), compute_uv=False)  # noqa: E731
    np.testing.assert_allclose(sv(X), sv(reference), rtol=1e-4)
    # the control keeps its own directions: same column space as the centred control
    P = np.linalg.lstsq(control - control.mean(0), X - X.mean(0), rcond=None)[0]
    np.testing.assert_allclose((control - control.mean(0)) @ P, X - X.mean(0), atol=1e-3)
    np.testing.assert_allclose(X.mean(0), control.mean(0), atol=1e-4)
    assert info == {"control_match": "spectrum", "control_rank": 16}
    Y, info = match_control(control, reference, "dim+scale")
    assert Y.var(0).sum() == pytest.approx(reference.var(0).sum(), rel=1e-5) and info["control_scale"] > 0
    Z, info = match_control(control, reference, "none")
    assert Z is control and info == {"control_match": "none"}
