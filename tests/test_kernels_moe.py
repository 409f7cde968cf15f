"""pitlm.kernels.moe: the router's and the shared expert gate's fused Triton kernels against transformers'
torch path. On the CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by conftest), the same
kernel code as on a GPU; the GPU test repeats the comparison in bf16 against float32."""

from __future__ import annotations

import pytest
import torch

from pitlm.kernels import moe as mk
from pitlm.kernels.triton_util import CPU_ENV

triton = pytest.importorskip("triton")


def reference_router(logits, top_k):
    """transformers' Qwen3_5MoeTopKRouter after its linear."""
    probs = torch.softmax(logits, dtype=torch.float, dim=-1)
    top, idx = torch.topk(probs, top_k, dim=-1)
    top = top / top.sum(dim=-1, keepdim=True)
    return top.to(logits.dtype), idx


def weights_and_grad(fn, logits, top_k, seed=0):
    x = logits.detach().clone().requires_grad_()
    w, idx = fn(x, top_k)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)).to(w)
    (w * g).sum().backward()
    return w.detach(), idx, x.grad


@pytest.mark.parametrize(("n_experts", "top_k"), [(8, 2), (256, 8), (12, 3)])  # the tiny model, the 35B, padded
def test_router_equals_softmax_topk_renormalised_with_gradients(interpret, n_experts, top_k):
    logits = torch.randn(37, n_experts, generator=torch.Generator().manual_seed(n_experts))  # 37: a partial block
    w, idx, g = weights_and_grad(mk.router_topk, logits, top_k)
    w_ref, idx_ref, g_ref = weights_and_grad(reference_router, logits, top_k)
    assert idx.dtype == torch.int64 and torch.equal(idx, idx_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-7)
    assert g_ref.abs().max() > 1e-3
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)


def test_router_breaks_exact_ties_by_the_lower_expert(interpret):
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0, 2.0, 0.0]])
    w, idx = mk.router_topk(logits, 3)
    assert idx.tolist() == [[1, 2, 4]]
    torch.testing.assert_close(w, torch.full((1, 3), 1 / 3))


def reference_gate_add(y, shared, gate_logit):
    return y + torch.sigmoid(gate_logit) * shared


@pytest.mark.parametrize("hidden", [24, 1500])  # one masked block; two blocks in the backward's loop
def test_shared_gate_add_equals_the_reference_with_gradients(interpret, hidden):
    gen = torch.Generator().manual_seed(hidden)
    y, shared = (torch.randn(13, hidden, generator=gen) for _ in range(2))
    gl = torch.randn(13, 1, generator=gen) * 2
    inputs = [t.requires_grad_() for t in (y, shared, gl)]
    ref_inputs = [t.detach().clone().requires_grad_() for t in (y, shared, gl)]
    out, ref = mk.shared_gate_add(*inputs), reference_gate_add(*ref_inputs)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    g = torch.randn(out.shape, generator=gen)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for a, b in zip(inputs, ref_inputs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_refused_with_one_line():
    with pytest.raises(ValueError, match="0 < top_k <= experts"):
        mk.router_topk(torch.zeros(4, 3), 4)
    with pytest.raises(ValueError, match="\\(tokens, 1\\)"):
        mk.shared_gate_add(torch.zeros(4, 5), torch.zeros(4, 5), torch.zeros(4))


def tiny_lora_model(dtype=torch.float32, device="cpu"):
    from pitlm.train.config import LoraConfig
    from pitlm.train.model import apply_lora, build_model_config, build_scratch_model

    torch.manual_seed(0)
    model = apply_lora(build_scratch_model(build_model_config("tiny-qwen3.5-moe"), torch.float32),
                       LoraConfig(preset="qwen3.5-moe"))
    with torch.no_grad():  # realistic routers and gates (the init leaves them at zero) and non-zero adapters
        for name, p in model.named_parameters():
            if "lora_B" in name or name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                p.normal_(0, 0.2)
    return model.to(device=device, dtype=dtype)


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()
                                   if p.grad is not None}


def test_the_model_takes_both_kernels_and_keeps_its_loss_and_gradients(interpret, monkeypatch):
    """The tiny Qwen3.5-MoE with LoRA: installing the kernels changes neither the loss nor any trainable
    parameter's gradient, the kernels really ran (each call counted), and switched off the torch path is back."""
    model = tiny_lora_model()
    ids = torch.randint(2, 258, (2, 24), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = loss_and_grads(model, ids)
    calls = {"router": 0, "gate": 0}
    real_router, real_gate = mk.router_topk, mk.shared_gate_add

    def counted(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(mk, "router_topk", counted("router", real_router))
    monkeypatch.setattr(mk, "shared_gate_add", counted("gate", real_gate))
    assert mk.install_moe_kernels(model) == (4, 4)
    assert mk.install_moe_kernels(model) == (4, 4)  # idempotent: switched on again, not wrapped twice
    loss, grads = loss_and_grads(model, ids)
    assert calls == {"router": 4, "gate": 4}
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys() and any("lora" in n for n in grads)
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().clamp(min=1e-12)
        assert (g - ref_grads[name]).abs().max() / scale < 1e-4, name
    assert mk.install_moe_kernels(model, on=False) == (4, 4)
    loss_and_grads(model, ids)
    assert calls == {"router": 4, "gate": 4}  # off: transformers' forward


def test_cpu_tensors_keep_transformers_forward_unless_asked(interpret, monkeypatch):
    model = tiny_lora_model()
    mk.install_moe_kernels(model)
    monkeypatch.delenv(CPU_ENV)

    def never(*a, **k):
        raise AssertionError("a CPU tensor reached the kernel")

    monkeypatch.setattr(mk, "router_topk", never)
    monkeypatch.setattr(mk, "shared_gate_add", never)
    ids = torch.randint(2, 258, (2, 8))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter truncates to bf16)")
def test_kernels_in_bf16_on_the_gpu_are_as_close_to_float32_as_the_reference():
    ids = torch.randint(2, 258, (4, 256), device="cuda")
    loss32, g32 = loss_and_grads(tiny_lora_model(torch.float32, "cuda"), ids)
    model16 = tiny_lora_model(torch.bfloat16, "cuda")
    loss_ref, g_ref = loss_and_grads(model16, ids)
    assert mk.install_moe_kernels(model16) == (4, 4)
    loss_fast, g_fast = loss_and_grads(model16, ids)

    def flat(g):
        return torch.cat([g[n].flatten() for n in sorted(g32)])

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert rel(loss_fast, loss32) <= 1.5 * max(rel(loss_ref, loss32), 1e-3)
    assert rel(flat(g_fast), flat(g32)) <= 1.5 * max(rel(flat(g_ref), flat(g32)), 1e-2)
    # the 35B's router shape; each row a permutation of 256 distinct bf16 values (no ties: their order is torch's)
    logits = (torch.rand(16384, 256, device="cuda").argsort(dim=1) / 64 - 2).bfloat16()
    w32, _, gx32 = weights_and_grad(reference_router, logits.float(), 8)
    w, idx, gx = weights_and_grad(mk.router_topk, logits, 8)
    w_ref, idx_ref, gx_ref = weights_and_grad(reference_router, logits, 8)
    assert torch.equal(idx, idx_ref)
    assert rel(w.float(), w32) <= 1.5 * max(rel(w_ref.float(), w32), 1e-3)
    assert rel(gx.float(), gx32) <= 1.5 * max(rel(gx_ref.float(), gx32), 1e-3)
