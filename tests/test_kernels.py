"""pitlm.kernels: fla's fused conv/norm kernels installed on Gated-DeltaNet hybrids, CUDA tensors only."""

from __future__ import annotations

import types

import pytest
import torch

from pitlm.kernels import install as kernels
from pitlm.kernels.triton_util import has_triton


def tiny_hybrid(dtype=torch.float32, device="cpu"):
    from pitlm.train.model import build_model_config, build_scratch_model

    torch.manual_seed(0)
    return build_scratch_model(build_model_config("tiny-qwen3.5-moe"), dtype, device)


def refusing_fla():
    def never(*a, **k):
        raise AssertionError("a CPU tensor reached the GPU kernel")

    return types.SimpleNamespace(conv=never, rms_norm=never, rms_norm_gated=never)


def test_install_patches_conv_and_norms_and_keeps_cpu_on_the_reference(monkeypatch):
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as modeling

    monkeypatch.setattr(modeling, "causal_conv1d_fn", modeling.causal_conv1d_fn)  # restored after the test
    model = tiny_hybrid().eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        before = model(input_ids=tokens).logits
    monkeypatch.setattr(kernels, "_fla", refusing_fla)
    installed = kernels.install_fast_kernels(model, experts=True)
    n_layers = model.config.num_hidden_layers
    n_attn = sum(t == "full_attention" for t in model.config.layer_types)
    n_norm = 2 * n_layers + 2 * n_attn + 1  # input/post-attention per layer, q/k per attention layer, final
    routed = [f"{name} x{n_layers}" for name in (kernels.ROUTED, kernels.ROUTER, kernels.SHARED_GATE)] \
        if has_triton() else []
    rope = [f"{kernels.ROPE} (qwen3_5_moe)"] if has_triton() else []
    conv = [f"{kernels.CONV_SPLIT} x{n_layers - n_attn}"] if has_triton() else []
    assert installed == [*routed, *rope, "fla-causal-conv1d (qwen3_5_moe)", f"fla-rmsnorm x{n_norm}",
                         f"fla-gated-rmsnorm x{n_layers - n_attn}", f"{kernels.GDN} x{n_layers - n_attn}", *conv,
                         f"grouped-experts x{n_layers}"]
    # once only (the Triton kernels' switches are attributes: set again, to the same value)
    assert kernels.install_fast_kernels(model, experts=True) == [*routed, *rope, "fla-causal-conv1d (qwen3_5_moe)"]
    with torch.no_grad():
        after = model(input_ids=tokens).logits
    assert torch.equal(before, after)


def test_cpu_forwards_survive_transformers_binding_a_gpu_delta_rule(monkeypatch):
    """On a GPU machine transformers binds fla's Triton delta rule for every call; building a model through pitlm
    routes CPU calls back to the torch reference (here the GPU binding is a function refusing CPU tensors)."""
    import functools

    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as modeling

    ref = getattr(modeling.torch_chunk_gated_delta_rule, "__wrapped__", modeling.torch_chunk_gated_delta_rule)

    @functools.wraps(ref)
    def gpu_only(*args, **kwargs):
        raise ValueError("Pointer argument (at 0) cannot be accessed from Triton (cpu tensor?)")

    monkeypatch.setattr(modeling, "torch_chunk_gated_delta_rule", gpu_only)
    model = tiny_hybrid().eval()  # pitlm's builder installs the CPU dispatch
    assert modeling.torch_chunk_gated_delta_rule is not gpu_only
    with torch.no_grad():
        logits = model(input_ids=torch.randint(0, model.config.vocab_size, (2, 16))).logits
    assert torch.isfinite(logits).all()


def test_grouped_experts_forward_equals_transformers_experts():
    """The experts path installed for CUDA tensors (pitlm's grouped forward without adapters) against
    transformers' own experts forward, on the CPU in float32: same routed GEMMs, no masks."""
    from pitlm.kernels.experts import lora_experts_forward

    model = tiny_hybrid()
    experts = next(m for m in model.modules() if type(m).__name__.endswith("Experts"))
    for p in experts.parameters():  # random weights of a realistic scale (the init leaves some at zero)
        torch.nn.init.normal_(p, std=0.05)
    n, k = 37, model.config.num_experts_per_tok
    h = torch.randn(n, model.config.hidden_size)
    idx = torch.stack([torch.randperm(model.config.num_experts)[:k] for _ in range(n)])
    w = torch.rand(n, k)
    with torch.no_grad():
        ref = experts(h, idx, w)
        ours = lora_experts_forward(experts, h, idx, w, {})
    assert ref.abs().max() > 1e-3
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_install_is_a_no_op_without_deltanet_layers_or_fla(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    monkeypatch.setattr(kernels, "_fla", refusing_fla)
    assert kernels.install_fast_kernels(dense) == []
    monkeypatch.setattr(kernels, "_fla", lambda: None)  # the routed experts' kernels need only triton
    rope = [f"{kernels.ROPE} (qwen3_5_moe)"] if has_triton() else []
    routed = [f"{name} x4" for name in (kernels.ROUTED, kernels.ROUTER, kernels.SHARED_GATE)] \
        if has_triton() else []
    model = tiny_hybrid()
    assert kernels.install_fast_kernels(model, rope=False) == routed  # the rotary kernel left out when asked
    assert kernels.install_fast_kernels(model, routed=False) == rope  # the MoE block's switched off; rope by default
    flags = [a for name, a in kernels.fast_path_switches().items()  # lora-in-k: part of the routed experts'
             if name not in ("lora-in-k", "dense-one-node", "rope")]  # kernels; dense-one-node: the LoRA layers
    assert not any(getattr(m, f, False) for m in model.modules() for f in flags)


def cpu_fla(calls: list):
    """fla's functions with their documented semantics in torch, for CPU tensors: the conv on (B, T, D) inputs, and
    the delta rule with the value heads grouped over the key heads (value head h reads key head h // (HV / H)) and
    the decay gate -exp(A_log) * softplus(g + dt_bias) and sigmoid(beta) computed inside. The real kernels are
    checked against the reference on a GPU (test_fast_kernels_match_the_reference_on_the_gpu)."""
    import torch.nn.functional as F
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as modeling

    ref = getattr(modeling.torch_chunk_gated_delta_rule, "__wrapped__", modeling.torch_chunk_gated_delta_rule)

    def conv(x, weight, bias=None, activation=None, **kwargs):
        y = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=weight.shape[-1] - 1,
                     groups=x.shape[-1])[..., :x.shape[1]]
        return (F.silu(y) if activation in ("silu", "swish") else y).transpose(1, 2), None

    def delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, A_log=None,
                   dt_bias=None, use_beta_sigmoid_in_kernel=False, **kwargs):
        calls.append(q.shape)
        assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
        rep = v.shape[2] // q.shape[2]
        q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
        if use_gate_in_kernel:
            g = -A_log.float().exp() * F.softplus(g.float() + dt_bias)
        if use_beta_sigmoid_in_kernel:
            beta = beta.sigmoid()
        return ref(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)

    never = refusing_fla()
    return types.SimpleNamespace(conv=conv, delta_rule=delta_rule, rms_norm=never.rms_norm,
                                 rms_norm_gated=never.rms_norm_gated)


@pytest.mark.parametrize("conv", ["fla", "triton"])
def test_gated_deltanet_forward_equals_transformers_with_lora_and_gradients(monkeypatch, request, conv):
    """pitlm's Gated DeltaNet forward (grouped key heads, gates inside the delta rule; the conv + split by fla's
    conv and one split copy, or by pitlm.kernels.conv under Triton's interpreter) against transformers' on the
    CPU in float32, with fla's functions in torch (cpu_fla): the same loss and every gradient, with LoRA on its
    projections; off, and with a cache, transformers' forward runs."""
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as modeling

    from pitlm.kernels import conv as conv_kernel

    if conv == "triton":
        pytest.importorskip("triton")
        request.getfixturevalue("interpret")
    splits = []
    real_split = conv_kernel.conv_split
    monkeypatch.setattr(conv_kernel, "conv_split", lambda *a: splits.append(1) or real_split(*a))

    from pitlm.train.config import LoraConfig
    from pitlm.train.model import apply_lora

    monkeypatch.setattr(modeling, "causal_conv1d_fn", modeling.causal_conv1d_fn)  # restored after the test
    model = apply_lora(tiny_hybrid(), LoraConfig(preset="qwen3.5-moe"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = torch.randint(2, 258, (2, 70), generator=torch.Generator().manual_seed(3))  # > one 64-token chunk

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # as pitlm's train step
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = loss_and_grads()
    calls = []
    monkeypatch.setattr(kernels, "_fla", lambda: cpu_fla(calls))
    monkeypatch.setattr(kernels, "_fast_device", lambda t: True)
    n_gdn = sum(t == "linear_attention" for t in model.config.layer_types)
    # the MoE block's and the rotary kernels left out: the interpreter would run them too (tested elsewhere)
    assert f"{kernels.GDN} x{n_gdn}" in kernels.install_fast_kernels(model, routed=False, rope=False)
    loss, grads = loss_and_grads()
    assert len(calls) == n_gdn and calls[0][2] == model.config.linear_num_key_heads  # key heads not repeated
    assert len(splits) == (n_gdn if conv == "triton" else 0)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys() and any("in_proj_qkv.lora_A" in n for n in grads)
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().clamp(min=1e-12)
        assert (g - ref_grads[name]).abs().max() / scale < 1e-4, name
    with torch.no_grad():
        model.eval()(input_ids=ids, use_cache=True)  # a cache: transformers' forward (it keeps conv / state)
        assert len(calls) == n_gdn
        assert kernels.set_fast_path(model, "gdn", False) == n_gdn
        model(input_ids=ids, use_cache=False)
        assert len(calls) == n_gdn


def test_split_last_gives_contiguous_pieces_and_their_gradient():
    x = torch.randn(2, 5, 12, requires_grad=True)
    pieces = kernels.split_last(x, [3, 3, 6])
    assert all(p.is_contiguous() for p in pieces)
    for p, r in zip(pieces, torch.split(x, [3, 3, 6], dim=-1), strict=True):
        assert torch.equal(p, r)
    (pieces[0].sum() * 2 + pieces[2].pow(2).sum()).backward()  # the middle piece unused: a zero gradient
    torch.testing.assert_close(x.grad, torch.cat([torch.full((2, 5, 3), 2.0), torch.zeros(2, 5, 3),
                                                  2 * x.detach()[..., 6:]], dim=-1))
    with pytest.raises(ValueError, match="do not add up"):
        kernels.split_last(x, [3, 3])


def test_full_module_originals_share_the_trained_storage():
    from pitlm.train.config import LoraConfig
    from pitlm.train.model import apply_lora

    def wrappers(model):
        return {n: m for n, m in model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"}

    shared = apply_lora(tiny_hybrid(), LoraConfig(full_modules=["lm_head", "embed_tokens"]))
    assert len(wrappers(shared)) == 2
    for w in wrappers(shared).values():
        orig, copy = w.original_module.weight, w.modules_to_save["default"].weight
        assert orig.data_ptr() == copy.data_ptr() and not orig.requires_grad and copy.requires_grad
    kept = apply_lora(tiny_hybrid(), LoraConfig(full_modules=["lm_head", "embed_tokens"], full_modules_base_copy=True))
    for w in wrappers(kept).values():
        assert w.original_module.weight.data_ptr() != w.modules_to_save["default"].weight.data_ptr()


def fla_usable() -> bool:
    return torch.cuda.is_available() and kernels._fla() is not None


@pytest.mark.skipif(not fla_usable(), reason="needs a CUDA GPU with flash-linear-attention")
def test_fast_kernels_match_the_reference_on_the_gpu(monkeypatch):
    """bf16 on a GPU: loss and gradients with the fused kernels (fla's conv, norms and grouped-head delta rule with
    its gates inside, the MoE block's Triton kernels) vs the reference path, both against float32."""
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as modeling

    ref_conv = modeling.causal_conv1d_fn
    gdn_calls = []
    real_gdn = kernels.gdn_forward
    monkeypatch.setattr(kernels, "gdn_forward", lambda *a: gdn_calls.append(1) or real_gdn(*a))
    try:
        m32 = tiny_hybrid(torch.float32, "cuda")
        tokens = torch.randint(0, m32.config.vocab_size, (2, 257), device="cuda")

        def run(model):
            model.zero_grad(set_to_none=True)
            out = model(input_ids=tokens, labels=tokens, use_cache=False)  # as pitlm's train step
            out.loss.backward()
            return out.loss.detach().float(), torch.cat([p.grad.float().flatten() for p in model.parameters()
                                                         if p.grad is not None])

        loss32, g32 = run(m32)
        m16 = tiny_hybrid(torch.bfloat16, "cuda")
        m16.load_state_dict({k: v.to(torch.bfloat16) for k, v in m32.state_dict().items()})
        loss_ref, g_ref = run(m16)
        assert kernels.install_fast_kernels(m16, experts=True)
        loss_fast, g_fast = run(m16)
        assert len(gdn_calls) == sum(t == "linear_attention" for t in m16.config.layer_types)

        def rel(a, b):
            return float((a - b).norm() / b.norm())

        assert rel(loss_fast, loss32) <= 1.5 * max(rel(loss_ref, loss32), 1e-3)
        assert rel(g_fast, g32) <= 1.5 * max(rel(g_ref, g32), 1e-2)
    finally:
        modeling.causal_conv1d_fn = ref_conv
