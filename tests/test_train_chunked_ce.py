"""The chunked LM-head loss (the memory lever for a 248k vocabulary) equals the plain loss and its gradients."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from pitlm.train.step import forward_loss


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_chunked_loss_and_grads_equal_plain(chunk):
    tokens = torch.randint(0, 97, (3, 25), generator=torch.Generator().manual_seed(1))
    plain, chunked = _model(), _model()
    ref = forward_loss(plain, tokens)
    ref.backward()
    out = forward_loss(chunked, tokens, ce_chunk=chunk)
    out.backward()
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
    g_ref, g_out = _grads(plain), _grads(chunked)
    assert g_ref.keys() == g_out.keys() and "lm_head.weight" in g_out
    for name in g_ref:
        assert torch.allclose(g_out[name], g_ref[name], rtol=1e-5, atol=1e-6), name


def test_chunked_loss_through_peft_lora_with_full_lm_head():
    from peft import LoraConfig, get_peft_model

    tokens = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(2))
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    plain, chunked = get_peft_model(_model(), cfg), get_peft_model(_model(), cfg)
    chunked.load_state_dict(plain.state_dict())
    ref = forward_loss(plain, tokens)
    ref.backward()
    out = forward_loss(chunked, tokens, ce_chunk=5)
    out.backward()
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
    g_ref, g_out = _grads(plain), _grads(chunked)
    assert any("lora_A" in n for n in g_out) and any("modules_to_save" in n for n in g_out)
    for name in g_ref:
        assert torch.allclose(g_out[name], g_ref[name], rtol=1e-5, atol=1e-6), name


def test_ce_chunk_refused_under_fsdp2():
    from pitlm.errors import ConfigError
    from pitlm.train.config import TrainConfig, check_config

    with pytest.raises(ConfigError, match="ce_chunk with mode full"):
        check_config(TrainConfig(mode="full", corpus="c", base="b", ce_chunk=1024))


def test_head_linear_is_the_module_peft_routes_the_head_to():
    """The fused loss reads one weight: it must be the one head(x) uses, in every peft adapter state."""
    from peft import LoraConfig, get_peft_model

    from pitlm.train.step import backbone_and_head, head_linear

    cfg = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    model = get_peft_model(_model(), cfg)
    _, head = backbone_and_head(model)
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)  # the trained copy now differs from the original
    x = torch.randn(3, 32)
    assert torch.equal(head_linear(head)(x), head(x))
    assert head_linear(head) is head.modules_to_save["default"]
    with model.disable_adapter():
        assert head_linear(head) is head.original_module and torch.equal(head_linear(head)(x), head(x))
    lora_head = get_peft_model(_model(), LoraConfig(r=4, target_modules=["lm_head"]))
    assert head_linear(backbone_and_head(lora_head)[1]) is None  # a LoRA head is not one weight's output
    plain = _model()
    assert head_linear(plain.lm_head) is plain.lm_head


@pytest.mark.skipif(not torch.cuda.is_available(), reason="liger's fused linear cross-entropy needs a GPU")
def test_fused_linear_cross_entropy_matches_the_chunked_loss_on_the_gpu(monkeypatch):
    """bf16 on the GPU: liger's fused loss is no further from float32 than the checkpointed chunks it replaces, in
    the loss and in the gradients of the hidden states and of the head weight (loss scaled by 0.5, as under
    gradient accumulation)."""
    from pitlm.train import step

    if not step.liger_available():
        pytest.skip("liger-kernel not installed")
    torch.manual_seed(0)
    n, d, v = 3000, 256, 50_000
    h32, w32 = torch.randn(n, d, device="cuda"), torch.randn(v, d, device="cuda") * 0.05
    t = torch.randint(0, v, (n,), device="cuda")

    def run(dtype):
        h = h32.to(dtype).requires_grad_()
        head = torch.nn.Linear(d, v, bias=False, device="cuda", dtype=dtype)
        with torch.no_grad():
            head.weight.copy_(w32)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):  # as pitlm train runs
            loss = step.chunked_cross_entropy(h[None], head, t[None], 512)
        (loss * 0.5).backward()
        return [loss.detach().float(), h.grad.float(), head.weight.grad.float()]

    bf16_head = torch.nn.Linear(d, v, bias=False, device="cuda", dtype=torch.bfloat16)
    for autocast in (None, torch.bfloat16):  # pitlm's bf16 LoRA steps run under bf16 autocast: fused there too
        assert step.fused_ce_head(bf16_head, torch.bfloat16, "cuda", autocast) is bf16_head
    assert step.fused_ce_head(bf16_head, torch.bfloat16, "cuda", torch.float16) is None
    assert step.fused_ce_head(bf16_head, torch.bfloat16, "cpu") is None
    fused = run(torch.bfloat16)
    with monkeypatch.context() as m:
        m.setattr(step, "fused_ce_head", lambda *args: None)  # force the checkpointed chunks
        chunked, exact = run(torch.bfloat16), run(torch.float32)
    for name, f, c, e in zip(("loss", "hidden grad", "weight grad"), fused, chunked, exact, strict=True):
        err_f = ((f - e).norm() / e.norm()).item()
        err_c = ((c - e).norm() / e.norm()).item()
        assert err_f <= 1.5 * err_c + 1e-6, (name, err_f, err_c)
