"""The grouped expert-LoRA path (pitlm.kernels.experts) against peft's own materialising path on the tiny hybrid
Qwen3.5-MoE: same loss, same gradients for every trainable parameter, peft's path back whenever adapters are off."""

import copy

import pytest
import torch

from pitlm.kernels.experts import (
    grouped_linear,
    install_expert_lora,
    lora_experts_forward,
    permute_routed,
    unpermute_routed,
)
from pitlm.train.config import LoraConfig
from pitlm.train.model import apply_lora, build_model_config, build_scratch_model


def lora_model(seed: int = 0, **lora):
    """peft's own paths (the reference) unless `lora` says otherwise; the tests install pitlm's."""
    torch.manual_seed(seed)
    base = build_scratch_model(build_model_config("tiny-qwen3.5-moe"), torch.float32)
    lora = {"experts_path": "peft", **lora}
    model = apply_lora(base, LoraConfig(preset="qwen3.5-moe", **lora))
    with torch.no_grad():  # peft starts B at 0; random B makes every adapter change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_grouped_path_equals_peft_in_loss_and_every_gradient():
    model = lora_model()
    ids = torch.randint(2, 258, (2, 24), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = loss_and_grads(model, ids)
    assert install_expert_lora(model) == 4  # every MoE layer of the 4-layer model
    loss, grads = loss_and_grads(model, ids)
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=0)
    expert_lora = [n for n in grads if ".mlp.experts." in n and "lora_" in n]
    assert len(expert_lora) == 2 * 2 * 4  # A and B of gate_up_proj and down_proj in 4 layers
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().clamp(min=1e-12)
        assert (g - ref_grads[name]).abs().max() / scale < 1e-4, name
    for name in expert_lora:  # the experts' adapters get a real gradient, not zeros
        assert grads[name].abs().max() > 0, name


def test_scaling_and_adapter_switches_reach_the_grouped_path():
    """Changing the LoRA scaling changes the output identically on both paths; with adapters disabled (peft's
    fallback) the output is the base model's."""
    model = lora_model(seed=3, alpha=64.0)
    ids = torch.randint(2, 258, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        install_expert_lora(model)
        out = model(input_ids=ids).logits
        with model.disable_adapter():
            off = model(input_ids=ids).logits
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(off, base, atol=1e-6, rtol=0)
    assert (out - base).abs().max() > 1e-3  # the adapters do something, so the comparison above means something


@pytest.mark.parametrize("dims", [(16, 8), (6, 3)])  # aligned for torch's grouped GEMM; unaligned -> the loop
def test_grouped_linear_equals_per_group_matmul(dims):
    d_in, d_out = dims
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(11, d_in, generator=g), torch.randn(3, d_out, d_in, generator=g)
    counts = [4, 0, 7]  # an empty group in the middle
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    ref = torch.cat([x[:4] @ w[0].T, x[4:] @ w[2].T])
    assert torch.allclose(grouped_linear(x, w, offsets), ref, atol=1e-5, rtol=1e-5)


def routing(num_tokens, top_k, used_experts, seed):
    """top_k distinct experts per token drawn from `used_experts` (the others get no token), and the sort
    permutation with its inverse as lora_experts_forward builds them."""
    g = torch.Generator().manual_seed(seed)
    used = torch.tensor(used_experts)
    index = torch.stack([used[torch.randperm(len(used), generator=g)[:top_k]] for _ in range(num_tokens)])
    _, perm = torch.sort(index.reshape(-1))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return index, perm, inv


@pytest.mark.parametrize("top_k", [1, 3])
def test_permute_and_unpermute_equal_plain_indexing_in_value_and_gradient(top_k):
    T, H = 5, 4
    _, perm, inv = routing(T, top_k, [0, 2, 3, 6], seed=top_k)  # of 8 experts: 1, 4, 5, 7 get no token
    src = perm // top_k
    g = torch.Generator().manual_seed(7)
    tokens = torch.randn(T, H, dtype=torch.float64, generator=g, requires_grad=True)
    rows = torch.randn(T * top_k, H, dtype=torch.float64, generator=g, requires_grad=True)
    for ours, ref, inp in ((lambda t: permute_routed(t, src, inv, top_k), lambda t: t[src], tokens),
                           (lambda r: unpermute_routed(r, src, inv, top_k),
                            lambda r: r[inv].view(T, top_k, H).sum(1), rows)):
        out, expected = ours(inp), ref(inp)
        assert torch.equal(out, expected)
        cot = torch.randn(out.shape, dtype=torch.float64, generator=g)
        (grad,), (grad_ref,) = torch.autograd.grad(out, inp, cot), torch.autograd.grad(expected, inp, cot)
        assert torch.allclose(grad, grad_ref, rtol=1e-12, atol=1e-12)
        assert torch.autograd.gradcheck(ours, (inp,))
        assert torch.autograd.gradgradcheck(ours, (inp,))  # each backward is the other map, itself differentiable
    weights = torch.rand(T * top_k, dtype=torch.float64, generator=g, requires_grad=True)  # 1-D, top_k = 1
    assert torch.autograd.gradcheck(lambda w: permute_routed(w, perm, inv, 1), (weights,))


def test_grouped_experts_backward_does_no_index_put():
    """The routed-token gather and scatter-back run as gathers both ways: no indexing node (whose backward is an
    accumulating index_put_) in the graph of one experts forward."""
    model = lora_model(seed=2)
    experts = next(m for n, m in model.named_modules() if n.endswith("mlp.experts")).get_base_layer()
    index, _, _ = routing(6, 2, list(range(experts.gate_up_proj.shape[0])), seed=0)
    hidden = torch.randn(6, experts.gate_up_proj.shape[-1], requires_grad=True)
    out = lora_experts_forward(experts, hidden, index, torch.rand(6, 2, requires_grad=True), {})
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(f for f, _ in node.next_functions)
    names = {type(n).__name__ for n in seen}
    assert "_UnpermuteRoutedBackward" in names and not any(n.startswith("Index") for n in names), names


def test_deepcopy_of_a_grouped_model_computes_with_its_own_adapters():
    """The installed forward reads adapters, experts and fallback from the module it runs on: a deepcopy with
    changed expert adapters matches peft's path on an equally changed model, and leaves the original's
    parameters without gradient."""
    model = lora_model(seed=6)
    ref = copy.deepcopy(model)  # peft's path
    install_expert_lora(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for m in (twin, ref):
            for name, p in m.named_parameters():
                if ".mlp.experts." in name and "lora_B" in name:
                    p.mul_(-3.0)
    ids = torch.randint(2, 258, (2, 16), generator=torch.Generator().manual_seed(8))
    ref_loss, ref_grads = loss_and_grads(ref, ids)
    loss, grads = loss_and_grads(twin, ids)
    with torch.no_grad():
        assert (model(input_ids=ids, labels=ids).loss - loss).abs() > 1e-4  # the change shows in the output
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=0)
    for name, g in grads.items():
        assert (g - ref_grads[name]).abs().max() / ref_grads[name].abs().max().clamp(min=1e-12) < 1e-4, name
        if ".mlp.experts." in name and "lora_" in name:
            assert g.abs().max() > 0, name
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad(), twin.disable_adapter(), ref.disable_adapter():  # the fallback is the copy's too
        assert torch.allclose(twin(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-6, rtol=0)


def test_merge_after_training_on_the_grouped_path_is_peft_merge():
    """Adapters trained through the grouped path are ordinary peft adapters: merging gives the same logits."""
    model = lora_model(seed=5)
    install_expert_lora(model)
    ids = torch.randint(2, 258, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    assert torch.allclose(merged, out, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_experts_match_peft_in_bf16_on_the_gpu():
    """bf16 on a GPU: the grouped expert-LoRA path is no further from a float32 reference than peft's own bf16
    path (METHOD.md's tolerance rule)."""
    ref32 = lora_model(seed=9).cuda()
    ids = torch.randint(2, 258, (2, 64), generator=torch.Generator().manual_seed(6)).cuda()
    loss32, g32 = loss_and_grads(ref32, ids)
    peft16 = copy.deepcopy(ref32).to(torch.bfloat16)
    ours16 = copy.deepcopy(peft16)
    install_expert_lora(ours16)

    def errors(model):
        loss, grads = loss_and_grads(model, ids)
        g = torch.cat([grads[n].float().flatten() for n in g32])
        ref = torch.cat([g32[n].flatten() for n in g32])
        return float((loss.float() - loss32).abs() / loss32.abs()), float((g - ref).norm() / ref.norm())

    (lp, gp), (lo, go) = errors(peft16), errors(ours16)
    assert lo <= 1.5 * max(lp, 1e-3) and go <= 1.5 * max(gp, 1e-2), ((lo, go), (lp, gp))
