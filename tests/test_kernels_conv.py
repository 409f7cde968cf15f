"""pitlm.kernels.conv: the Gated DeltaNet's causal conv1d + SiLU + split against transformers' maths (F.conv1d
with left padding, SiLU, split). On the CPU the kernels run under Triton's interpreter (conftest)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pitlm.kernels import conv as ck

pytest.importorskip("triton")


def reference(x, weight, bias, silu, sizes):
    """transformers' Qwen3.5 path: conv1d over (B, D, T) with W - 1 zeros on the left, SiLU, split along D."""
    y = F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=weight.shape[1] - 1, groups=x.shape[-1])
    y = y[..., : x.shape[1]].transpose(1, 2)
    return torch.split(F.silu(y) if silu else y, list(sizes), dim=-1)


@pytest.mark.parametrize(("seq", "sizes", "has_bias", "silu", "tiles"), [
    (37, (8, 8, 16), False, True, None),  # Qwen3.5's shape in small: q, k, v; no multiple of the tiles
    (300, (12, 4), True, True, "16,64,64,2,1"),  # two outputs, 4-channel blocks, bias, 4 tiles a program, kept sums
    (300, (12, 4), True, True, "16,64,64,2,0"),  # the same with the sums reduced per tile
    (3, (16,), True, False, None),  # shorter than the window, no activation
])
def test_conv_split_equals_transformers_in_values_and_gradients(interpret, monkeypatch, seq, sizes, has_bias, silu,
                                                                tiles):
    if tiles:
        monkeypatch.setattr(ck, "TILES", ck._tiles(tiles))
    width = ck.WIDTH
    gen = torch.Generator().manual_seed(seq)
    dim = sum(sizes)
    x = torch.randn(2, seq, dim, generator=gen)
    weight = torch.randn(dim, width, generator=gen)
    bias = torch.randn(dim, generator=gen) if has_bias else None
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    ours = [t.clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    ref = reference(leaves[0], leaves[1], leaves[2] if has_bias else None, silu, sizes)
    out = ck.conv_split(ours[0], ours[1], ours[2] if has_bias else None, "silu" if silu else None, list(sizes))
    assert len(out) == len(sizes)
    for o, r in zip(out, ref, strict=True):
        assert o.is_contiguous()
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    grads = [torch.randn(r.shape, generator=gen) for r in ref]
    torch.autograd.backward(ref, grads)
    torch.autograd.backward(out, grads)
    for a, b in zip(ours, leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-4)


def test_an_unused_output_has_no_gradient_and_a_frozen_weight_gets_none(interpret):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 20, 24, generator=gen, requires_grad=True)
    weight = torch.randn(24, 4, generator=gen)
    q, k, v = ck.conv_split(x, weight, None, "silu", [8, 8, 8])
    (v * 2).sum().backward()  # q and k unused: their gradients arrive as None
    xr = x.detach().clone().requires_grad_()
    (reference(xr, weight, None, True, (8, 8, 8))[2] * 2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    x.grad = xr.grad = None
    ck.conv_split(x, weight, None, "silu", [8, 8, 8])[0].sum().backward()  # an expanded (stride 0) gradient
    reference(xr, weight, None, True, (8, 8, 8))[0].sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)


def test_bad_input_is_refused_with_one_line():
    with pytest.raises(ValueError, match="widths adding up to D"):
        ck.conv_split(torch.zeros(1, 4, 8), torch.zeros(8, 4), None, "silu", [4, 5])
    with pytest.raises(ValueError, match="activation 'gelu'"):
        ck.conv_split(torch.zeros(1, 4, 8), torch.zeros(8, 4), None, "gelu", [8])
    with pytest.raises(ValueError, match=r"weight \(D, 4\)"):  # the kernels' window is 4 wide
        ck.conv_split(torch.zeros(1, 4, 8), torch.zeros(8, 3), None, "silu", [8])
    assert not ck.supported(torch.zeros(1, 4, 8), torch.zeros(8, 3), "silu")
    for spec in ("16,64,24,2", "16,48,16,2", "16,64,16", "a,b,c,d"):
        with pytest.raises(ValueError, match=ck.TILES_ENV):
            ck._tiles(spec)
    assert ck.block_d((2048, 2048, 4096)) == 128 and ck.block_d((12, 4)) == 4 and ck.block_d((6, 9)) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter truncates to bf16)")
def test_conv_split_in_bf16_on_the_gpu_is_as_close_to_float32_as_transformers():
    """The 35B-A3B's layer shape at a short sequence: bf16 through the kernels against float32, no further from it
    than transformers' bf16 path (values and the gradients of x and weight)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    sizes = (2048, 2048, 4096)
    x = torch.randn(2, 300, 8192, device="cuda", generator=gen)
    weight = torch.randn(8192, 4, device="cuda", generator=gen) * 0.5
    grads = [torch.randn(2, 300, n, device="cuda", generator=gen) for n in sizes]

    def run(fn, dtype):
        xs, ws = x.to(dtype, copy=True).requires_grad_(), weight.to(dtype, copy=True).requires_grad_()
        out = fn(xs, ws)
        torch.autograd.backward(out, [g.to(dtype) for g in grads])
        return [o.float() for o in out] + [xs.grad.float(), ws.grad.float()]

    exact = run(lambda a, w: reference(a, w, None, True, sizes), torch.float32)
    ref_bf16 = run(lambda a, w: reference(a, w, None, True, sizes), torch.bfloat16)
    ours = run(lambda a, w: ck.conv_split(a, w, None, "silu", list(sizes)), torch.bfloat16)
    for e, r, o in zip(exact, ref_bf16, ours, strict=True):
        ref_err = (r - e).abs().max().item()
        assert (o - e).abs().max().item() <= 1.5 * ref_err + 1e-3, (ref_err, (o - e).abs().max().item())
