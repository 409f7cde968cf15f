"""pitlm.kernels.rope: the partial rotary embedding kernel against transformers' apply_rotary_pos_emb. On the
CPU the kernel runs under Triton's interpreter (conftest), the same code as on a GPU."""

from __future__ import annotations

import pytest
import torch

from pitlm.kernels import rope as rk
from pitlm.kernels.registry import PARTIAL_ROPE

pytest.importorskip("triton")


def modeling():
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe

    return modeling_qwen3_5_moe


def cos_sin(batch, seq, rot, gen):
    ang = torch.randn(batch, seq, rot // 2, generator=gen)
    return torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)


@pytest.mark.parametrize(("dim", "rot", "kv_heads", "cos_batch"), [(16, 4, 2, 2), (20, 20, 1, 1), (12, 6, 3, 2)])
def test_rope_equals_transformers_in_values_and_gradients(interpret, dim, rot, kv_heads, cos_batch):
    """Partial and full rotation, a head width that is no power of 2, cos shared over the batch; q and k in
    transformers' layout (a transposed view of (batch, tokens, heads, dim))."""
    gen = torch.Generator().manual_seed(dim + rot)
    q = torch.randn(2, 7, 3, dim, generator=gen).transpose(1, 2)
    k = torch.randn(2, 7, kv_heads, dim, generator=gen).transpose(1, 2)
    cos, sin = cos_sin(cos_batch, 7, rot, gen)
    leaves = [t.clone().requires_grad_() for t in (q, k)]
    ours = [t.clone().requires_grad_() for t in (q, k)]
    ref = modeling().apply_rotary_pos_emb(*leaves, cos, sin)
    out = [rk.rope(t, cos, sin) for t in ours]
    for o, r in zip(out, ref, strict=True):
        assert o.transpose(1, 2).is_contiguous()  # the input's layout: (batch, tokens, heads, dim) in memory
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)
    grads = [torch.randn(r.shape, generator=gen) for r in ref]
    torch.autograd.backward(ref, grads)
    torch.autograd.backward(out, grads)
    for a, b in zip(ours, leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)


def test_an_expanded_gradient_is_read_right(interpret):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 5, 8, generator=gen, requires_grad=True)
    cos, sin = cos_sin(1, 5, 4, gen)
    rk.rope(x, cos, sin).sum().backward()  # the gradient arrives as ones expanded with stride 0
    ref = x.detach().clone().requires_grad_()
    modeling().apply_rotary_pos_emb(ref, ref, cos, sin)[0].sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-6, atol=1e-6)


def test_bad_shapes_are_refused_with_one_line():
    with pytest.raises(ValueError, match="even R <= dim"):
        rk.rope(torch.zeros(1, 2, 3, 4), torch.zeros(1, 3, 6), torch.zeros(1, 3, 6))


def test_installed_on_the_model_it_keeps_loss_and_gradients_and_falls_back_when_off(interpret, monkeypatch):
    from pitlm.train.model import build_model_config, build_scratch_model

    torch.manual_seed(0)
    model = build_scratch_model(build_model_config("tiny-qwen3.5-moe"), torch.float32)
    ids = torch.randint(2, 258, (2, 24), generator=torch.Generator().manual_seed(2))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = loss_and_grads()
    calls = []
    real = rk.rope
    monkeypatch.setattr(rk, "rope", lambda *a: calls.append(1) or real(*a))
    assert rk.install_rope(modeling()) and rk.install_rope(modeling())  # idempotent
    loss, grads = loss_and_grads()
    n_attn = sum(t == "full_attention" for t in model.config.layer_types)
    assert len(calls) == 2 * n_attn  # q and k of each attention layer
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(PARTIAL_ROPE, "process_on", False)
    loss_and_grads()
    assert len(calls) == 2 * n_attn


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter truncates to bf16)")
def test_rope_in_bf16_on_the_gpu_is_as_close_to_float32_as_transformers():
    """The 35B-A3B's attention shapes (16 query / 2 key heads of 256, the first 64 rotated), bf16 against float32."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2048, 16, 256, generator=gen).bfloat16().cuda().transpose(1, 2)
    k = torch.randn(2, 2048, 2, 256, generator=gen).bfloat16().cuda().transpose(1, 2)
    cos, sin = (t.bfloat16().cuda() for t in cos_sin(2, 2048, 64, gen))
    ref32 = modeling().apply_rotary_pos_emb(q.float(), k.float(), cos.float(), sin.float())
    ref = modeling().apply_rotary_pos_emb(q, k, cos, sin)
    out = rk.rope(q, cos, sin), rk.rope(k, cos, sin)

    def rel(a, b):
        return float((a.float() - b).norm() / b.norm())

    for o, r, r32 in zip(out, ref, ref32, strict=True):
        assert o.dtype == torch.bfloat16
        assert rel(o, r32) <= 1.5 * max(rel(r, r32), 1e-3)
