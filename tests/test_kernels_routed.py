"""pitlm.kernels.routed: the fused Triton kernels of the routed experts against the torch reference path.

On the CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1), so the same kernel code as on a GPU
is checked here; the GPU test repeats the comparison in bf16 against float32."""

from __future__ import annotations

import pytest
import torch

from pitlm.kernels import routed as rk
from pitlm.kernels.experts import install_expert_lora, permute_routed, unpermute_routed
from pitlm.kernels.registry import LORA_IN_K
from pitlm.kernels.triton_util import CPU_ENV

triton = pytest.importorskip("triton")


def reference_swiglu(base, lora, w):
    s = base if lora is None else base + lora
    gate, up = s.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up * w.unsqueeze(-1).to(s.dtype)


def grads_of(fn, *inputs, seed=0):
    inputs = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype).to(out.device)
    (out * g).sum().backward()
    return out.detach(), [None if t is None else t.grad for t in inputs]


@pytest.mark.parametrize("inter", [24, 320])  # one masked column block; two blocks in the backward's loop
@pytest.mark.parametrize("with_lora", [True, False])
def test_swiglu_equals_the_reference_with_gradients(interpret, inter, with_lora):
    gen = torch.Generator().manual_seed(inter)
    rows = 37  # not a multiple of the row block
    base = torch.randn(rows, 2 * inter, generator=gen, dtype=torch.float64).float()
    lora = torch.randn(rows, 2 * inter, generator=gen) if with_lora else None
    w = torch.rand(rows, generator=gen)
    out, grads = grads_of(rk.swiglu_routed, base, lora, w)
    ref, ref_grads = grads_of(reference_swiglu, base, lora, w)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        if r is None:
            assert g is None
        else:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_paired_outputs_keep_two_readers_gradients_apart_and_sum_them_in_the_kernel(interpret):
    """pair=True / the paired permute: one result, two readers (as the base and LoRA GEMMs); the gradients equal
    those of the single output read twice."""
    from pitlm.kernels.experts import _PermuteRoutedPair

    gen = torch.Generator().manual_seed(7)
    base, lora = (torch.randn(21, 40, generator=gen) for _ in range(2))
    w = torch.rand(21, generator=gen)
    m1, m2 = torch.randn(20, 3, generator=gen), torch.randn(20, 5, generator=gen)

    def readers(a, b):
        return torch.cat([(a @ m1).flatten(), (b @ m2).flatten()])

    _, g_pair = grads_of(lambda b, lo, wt: readers(*rk.swiglu_routed(b, lo, wt, pair=True)), base, lora, w)
    _, g_one = grads_of(lambda b, lo, wt: readers(*[reference_swiglu(b, lo, wt)] * 2), base, lora, w)
    for a, b in zip(g_pair, g_one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    n_tokens, top_k = 6, 3
    tokens = torch.randn(n_tokens, 20, generator=gen)
    inv = torch.randperm(n_tokens * top_k, generator=gen)
    src = torch.empty_like(inv)
    src[inv] = torch.arange(inv.numel()) // top_k
    _, (g_pair,) = grads_of(lambda t: readers(*_PermuteRoutedPair.apply(t, src, inv, top_k)), tokens)
    _, (g_one,) = grads_of(lambda t: readers(*[t.index_select(0, src)] * 2), tokens)
    torch.testing.assert_close(g_pair, g_one, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter truncates to bf16)")
def test_swiglu_in_bf16_is_as_close_to_float32_as_the_reference():
    """bf16 kernel vs bf16 torch reference, both against float32 on the same bf16 inputs (METHOD.md's rule)."""
    gen = torch.Generator().manual_seed(5)
    base, lora = (torch.randn(4096, 1024, generator=gen).bfloat16().cuda() for _ in range(2))
    w = torch.rand(4096, generator=gen).cuda()
    out32, g32 = grads_of(reference_swiglu, base.float(), lora.float(), w)
    out_ref, g_ref = grads_of(reference_swiglu, base, lora, w)
    out, g = grads_of(rk.swiglu_routed, base, lora, w)
    assert out.dtype == torch.bfloat16 and g[0].dtype == torch.bfloat16 and g[2].dtype == torch.float32

    def rel(a, b):
        return float((a.float() - b).norm() / b.norm())

    assert rel(out, out32) <= 1.5 * max(rel(out_ref, out32), 1e-3)
    for i in range(3):
        assert rel(g[i], g32[i]) <= 1.5 * max(rel(g_ref[i], g32[i]), 1e-3)


@pytest.mark.parametrize("with_extra", [True, False])
def test_gather_sum_equals_the_reference_unpermute(interpret, with_extra):
    gen = torch.Generator().manual_seed(2)
    n_tokens, top_k, hidden = 11, 4, 1500  # hidden over one 1024-column block, masked
    rows = torch.randn(n_tokens * top_k, hidden, generator=gen)
    extra = torch.randn(rows.shape, generator=gen) if with_extra else None
    inv = torch.randperm(n_tokens * top_k, generator=gen)
    src = torch.empty_like(inv)
    src[inv] = torch.arange(inv.numel()) // top_k  # inv[perm[s]] = s, src = perm // top_k
    out = rk.gather_sum(rows, extra, inv, top_k)
    ref = unpermute_routed(rows, src, inv, top_k, extra=extra, fused=False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the autograd wrappers: the fused gather-and-sum in forward (unpermute) and in backward (permute)
    for fused_fn, ref_fn in (
            (lambda r, e: unpermute_routed(r, src, inv, top_k, extra=e, fused=True),
             lambda r, e: unpermute_routed(r, src, inv, top_k, extra=e, fused=False)),
            (lambda r, e: permute_routed(r[:n_tokens], src, inv, top_k, fused=True),
             lambda r, e: permute_routed(r[:n_tokens], src, inv, top_k, fused=False))):
        o, g = grads_of(fused_fn, rows, extra)
        o_ref, g_ref = grads_of(ref_fn, rows, extra)
        torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(g, g_ref, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden", [24, 1500])  # one masked column block; three
def test_gather_rows_equals_index_select(interpret, hidden):
    gen = torch.Generator().manual_seed(hidden)
    tokens = torch.randn(13, hidden, generator=gen)
    src = torch.randint(0, 13, (61,), generator=gen)  # rows not a multiple of the row block
    torch.testing.assert_close(rk.gather_rows(tokens, src), tokens.index_select(0, src), rtol=0, atol=0)


def lora_model():
    from pitlm.train.config import LoraConfig
    from pitlm.train.model import apply_lora, build_model_config, build_scratch_model

    torch.manual_seed(0)
    base = build_scratch_model(build_model_config("tiny-qwen3.5-moe"), torch.float32)
    model = apply_lora(base, LoraConfig(preset="qwen3.5-moe", experts_path="peft"))
    with torch.no_grad():  # peft starts B at 0; random B makes every adapter change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    assert install_expert_lora(model) == 4
    return model


def test_the_lora_model_takes_the_kernels_and_keeps_its_loss_and_gradients(interpret, monkeypatch):
    """The tiny Qwen3.5-MoE with LoRA on its experts: switching the kernels on changes neither the loss nor any
    trainable parameter's gradient, and the kernels really ran (each call counted, then computed for real)."""
    model = lora_model()
    ids = torch.randint(2, 258, (2, 24), generator=torch.Generator().manual_seed(1))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref_grads = loss_and_grads()
    calls = {"swiglu": 0, "gather_sum": 0, "gather_rows": 0}
    real_swiglu, real_gather, real_rows = rk.swiglu_routed, rk.gather_sum, rk.gather_rows

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(rk, "swiglu_routed", count("swiglu", real_swiglu))
    monkeypatch.setattr(rk, "gather_sum", count("gather_sum", real_gather))
    monkeypatch.setattr(rk, "gather_rows", count("gather_rows", real_rows))
    assert rk.set_routed_kernels(model, True) == 4
    loss, grads = loss_and_grads()
    # 4 MoE layers: SwiGLU once each; gather-sum once forward (down rows) and once backward (input gradient);
    # gather-rows once forward (the permute) and once backward (the down rows' gradient)
    assert calls == {"swiglu": 4, "gather_sum": 8, "gather_rows": 8}
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert any(".mlp.experts." in n for n in grads)
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().clamp(min=1e-12)
        assert (g - ref_grads[name]).abs().max() / scale < 1e-4, name


def test_cpu_tensors_keep_the_torch_path_unless_asked_and_only_the_default_gate_is_fused(interpret, monkeypatch):
    model = lora_model()
    experts = next(m for m in model.modules() if type(m).__name__.endswith("Experts"))
    assert rk.supports(experts) and rk.set_routed_kernels(model, True) == 4
    assert rk.enabled(experts, torch.zeros(1))
    monkeypatch.delenv(CPU_ENV)
    assert not rk.enabled(experts, torch.zeros(1))  # a CPU tensor keeps the torch path
    monkeypatch.setenv(CPU_ENV, "1")
    assert rk.set_routed_kernels(model, False) == 4 and not rk.enabled(experts, torch.zeros(1))

    class OwnGate(type(experts)):
        def _apply_gate(self, gate_up_out):
            return gate_up_out[..., : gate_up_out.shape[-1] // 2]

    experts.__class__ = OwnGate
    assert not rk.supports(experts)
    experts.__class__ = OwnGate.__mro__[1]
    experts.act_fn = torch.nn.GELU()
    assert not rk.supports(experts)


def test_bad_shapes_are_refused_with_one_line():
    with pytest.raises(ValueError, match="rows, 2\\*inter"):
        rk.swiglu_routed(torch.zeros(4, 5), None, torch.zeros(4))
    with pytest.raises(ValueError, match="tokens\\*top_k"):
        rk.gather_sum(torch.zeros(6, 4), None, torch.arange(6), 4)
    with pytest.raises(ValueError, match="\\(n, hidden\\) tokens"):
        rk.gather_rows(torch.zeros(6), torch.arange(6))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_in_bf16_on_the_gpu_match_the_reference_against_float32():
    """The LoRA model in bf16 on a GPU, kernels on vs off, both against the float32 model: loss and gradients."""
    model32 = lora_model().cuda()
    model16 = lora_model().cuda().to(torch.bfloat16)
    ids = torch.randint(2, 258, (4, 256), device="cuda")

    def run(model):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach().float(), torch.cat([p.grad.float().flatten() for p in model.parameters()
                                                 if p.grad is not None])

    loss32, g32 = run(model32)
    loss_ref, g_ref = run(model16)
    assert rk.set_routed_kernels(model16, True) == 4
    loss_fast, g_fast = run(model16)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert rel(loss_fast, loss32) <= 1.5 * max(rel(loss_ref, loss32), 1e-3)
    assert rel(g_fast, g32) <= 1.5 * max(rel(g_ref, g32), 1e-2)


def test_lora_in_the_gemms_k_equals_separate_gemms_and_keeps_the_weights(interpret, monkeypatch):
    """gate_up_proj's and down_proj's LoRA terms in their base GEMMs' K (padded routed rows / h and weight storage,
    pitlm.kernels.experts._LoRAInK) against the separate rank-r GEMMs: the same loss and every gradient; the base
    weights keep their values (now views of the padded storage) and the state dict its keys."""
    from pitlm.kernels import experts as ex

    model = lora_model()
    ids = torch.randint(2, 258, (2, 24), generator=torch.Generator().manual_seed(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert rk.set_routed_kernels(model, True) == 4
    moe = [m for m in model.modules() if type(m).__name__.endswith("Experts")]

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    for m in moe:
        setattr(m, LORA_IN_K.attr, False)
    ref_loss, ref_grads = loss_and_grads()
    calls = []
    real = ex._LoRAInK.apply
    monkeypatch.setattr(ex._LoRAInK, "apply", lambda *a: calls.append(1) or real(*a))
    for m in moe:
        setattr(m, LORA_IN_K.attr, True)
    loss, grads = loss_and_grads()
    assert len(calls) == 8  # 4 layers x (gate_up, down)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().clamp(min=1e-12)
        assert (g - ref_grads[name]).abs().max() / scale < 1e-5, name
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    rank = model.peft_config["default"].r
    for name in ("gate_up_proj", "down_proj"):
        store, w = getattr(moe[0], ex.PAD)[name], getattr(moe[0], name)
        assert store.shape[-1] == w.shape[-1] + ex.lora_pad(rank, w.shape[-1])
        assert w.data_ptr() == store.data_ptr() and not w.requires_grad
        assert ex.padded_weight(moe[0], name, store.shape[-1] - w.shape[-1]) is store


def test_lora_pad_keeps_rows_16_byte_aligned_and_grouped_weight_grad_matches_a_loop():
    from pitlm.kernels.experts import grouped_weight_grad, lora_pad

    for rank, width in ((16, 512), (8, 32), (5, 20), (1, 7)):
        pad = lora_pad(rank, width)
        assert pad >= rank and (width + pad) % 8 == 0 and pad - rank < 8
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 8, generator=gen), torch.randn(20, 16, generator=gen)
    offsets = torch.tensor([5, 5, 12, 20], dtype=torch.int32)  # group 1 empty
    out = grouped_weight_grad(a, b, offsets, 4)
    starts = [0, 5, 5, 12]
    for g, (s, e) in enumerate(zip(starts, offsets.tolist(), strict=True)):
        torch.testing.assert_close(out[g], a[s:e].t() @ b[s:e], rtol=1e-5, atol=1e-5)


def test_gather_kernels_read_and_write_the_first_columns_of_padded_buffers(interpret):
    """Rows strided by a padded buffer (the LoRA-in-K layout) are read in place by gather_sum and written in place
    by gather_rows(pad=) and swiglu_routed(pad=): the same values as contiguous tensors."""
    gen = torch.Generator().manual_seed(9)
    n_tokens, top_k, hidden, pad = 7, 3, 40, 8
    buf = torch.randn(n_tokens * top_k, hidden + pad, generator=gen)
    rows, extra = buf[:, :hidden], torch.randn(n_tokens * top_k, hidden, generator=gen)
    inv = torch.randperm(n_tokens * top_k, generator=gen)
    torch.testing.assert_close(rk.gather_sum(rows, extra, inv, top_k),
                               rk.gather_sum(rows.contiguous(), extra, inv, top_k), rtol=0, atol=0)
    tokens, src = torch.randn(n_tokens, hidden, generator=gen), torch.randint(0, n_tokens, (21,), generator=gen)
    out = rk.gather_rows(tokens, src, pad)
    assert out.stride(0) == hidden + pad and torch.equal(out, tokens.index_select(0, src))
    base, w = torch.randn(21, 2 * hidden, generator=gen), torch.rand(21, generator=gen)
    h = rk.swiglu_routed(base, None, w, pad=pad)
    assert h.stride(0) == hidden + pad
    torch.testing.assert_close(h, reference_swiglu(base, None, w), rtol=1e-6, atol=1e-6)


def test_lora_in_k_against_per_expert_products_with_adapters_in_another_dtype():
    """_LoRAInK alone: per expert, (h | s·h@A^T) @ (W | B)^T against h @ W^T + s·(h @ A^T) @ B^T, with the adapters
    in float64 (as float32 adapters beside bf16 activations on a GPU): the GEMMs run in the activations' dtype and
    each gradient comes back in its input's dtype."""
    from pitlm.kernels.experts import _LoRAInK, lora_pad

    gen = torch.Generator().manual_seed(11)
    n_exp, inter, out_w, rank, scaling = 3, 8, 6, 4, 0.5
    offsets = torch.tensor([5, 5, 12], dtype=torch.int32)  # expert 1 gets no row
    pad = lora_pad(rank, inter)
    w = torch.randn(n_exp, out_w, inter, generator=gen)
    store = torch.zeros(n_exp, out_w, inter + pad)
    store[..., :inter] = w
    h = torch.empty(12, inter + pad)[:, :inter]
    h.copy_(torch.randn(12, inter, generator=gen))
    rhs = torch.randn(n_exp, rank, inter, generator=gen, dtype=torch.float64).requires_grad_()  # A per expert
    lhs = torch.randn(n_exp, out_w, rank, generator=gen, dtype=torch.float64).requires_grad_()  # B per expert
    leaf = h.detach().clone().requires_grad_()
    hv = torch.empty(12, inter + pad)[:, :inter]
    hv.copy_(leaf.detach())
    hv.requires_grad_()
    out = _LoRAInK.apply(hv, hv, rhs, lhs, scaling, store, offsets)
    starts, ends = [0, 5, 5], offsets.tolist()
    ref = torch.cat([leaf[s:e] @ w[g].t() + scaling * (leaf[s:e] @ rhs[g].float().t()) @ lhs[g].float().t()
                     for g, (s, e) in enumerate(zip(starts, ends, strict=True))])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(out.shape, generator=gen)
    d_h, d_rhs, d_lhs = torch.autograd.grad(out, [hv, rhs, lhs], g)
    r_h, r_rhs, r_lhs = torch.autograd.grad(ref, [leaf, rhs, lhs], g)
    assert d_rhs.dtype == d_lhs.dtype == torch.float64 and d_h.dtype == torch.float32
    for a, b in ((d_h, r_h), (d_rhs, r_rhs), (d_lhs, r_lhs)):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-5)
    assert torch.equal(store[..., :inter], w)  # the base weight's columns untouched
