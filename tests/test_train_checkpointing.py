"""Activation checkpointing granularity: the last N decoder blocks may keep their activations (no recompute)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from pitlm.train.activations import enable_activation_checkpointing
from pitlm.train.model import decoder_layers


def _model():
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return AutoModelForCausalLM.from_config(cfg).train()


def _forward_counts_and_grads(model, ids):
    """How often each block's MLP ran over one forward + backward (2 = recomputed in backward), and the grads."""
    counts = [0] * len(decoder_layers(model))

    def counting(i, forward):  # a wrapper, not a forward hook: hooks do not fire inside the recompute
        def run(*args, **kwargs):
            counts[i] += 1
            return forward(*args, **kwargs)
        return run

    for i, layer in enumerate(decoder_layers(model)):
        layer.mlp.forward = counting(i, layer.mlp.forward)
    model(input_ids=ids, labels=ids).loss.backward()
    return counts, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("skip_last", [0, 1, 4])
def test_the_last_blocks_skip_the_recompute_with_the_same_gradients(skip_last):
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    plain_counts, ref = _forward_counts_and_grads(_model(), ids)
    model = _model()
    enable_activation_checkpointing(model, skip_last=skip_last)
    counts, grads = _forward_counts_and_grads(model, ids)
    assert plain_counts == [1, 1, 1, 1]
    assert counts == [2] * (4 - skip_last) + [1] * skip_last
    for name, g in ref.items():
        assert torch.allclose(grads[name], g, rtol=1e-5, atol=1e-7), name


def test_more_uncheckpointed_layers_than_the_model_has_is_refused():
    from pitlm.errors import ConfigError

    with pytest.raises(ConfigError, match="has only 4 decoder layers"):
        enable_activation_checkpointing(_model(), skip_last=5)


def _offloaded_nodes(loss) -> int:
    """How many offloaded-checkpoint nodes the autograd graph of `loss` holds."""
    seen, stack, count = set(), [loss.grad_fn], 0
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        count += type(fn).__name__ == "_OffloadedCheckpointBackward"
        stack.extend(f for f, _ in fn.next_functions)
    return count


@pytest.mark.parametrize("skip_last", [0, 1])
def test_offloaded_checkpoints_recompute_with_the_same_gradients(skip_last):
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    _, ref = _forward_counts_and_grads(_model(), ids)
    model = _model()
    enable_activation_checkpointing(model, skip_last=skip_last, offload=True)
    assert _offloaded_nodes(model(input_ids=ids, labels=ids).loss) == 4 - skip_last
    model.zero_grad()
    counts, grads = _forward_counts_and_grads(model, ids)
    assert counts == [2] * (4 - skip_last) + [1] * skip_last
    for name, g in ref.items():
        assert torch.allclose(grads[name], g, rtol=1e-5, atol=1e-7), name


def test_offloaded_checkpoints_train_a_block_whose_input_needs_no_gradient():
    """Frozen embeddings without the input-grad hook (LoRA alone): a reentrant-style function of the first block
    would give its trainable parameters no gradient; that block takes torch's checkpoint instead."""
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))

    def grads(checkpointed: bool):
        model = _model()
        for name, p in model.named_parameters():
            p.requires_grad_("layers.0.mlp" in name or "layers.2.mlp" in name)
        if checkpointed:
            enable_activation_checkpointing(model, offload=True)
            model.disable_input_require_grads()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    ref, got = grads(False), grads(True)
    assert len(ref) == 6 and all(g is not None for g in ref.values())
    for name, g in ref.items():
        assert got[name] is not None and torch.allclose(got[name], g, rtol=1e-5, atol=1e-7), name


def test_offloaded_checkpoints_recompute_under_the_forwards_autocast_and_rng():
    """The backward runs outside the step's autocast and after other draws from the RNG: the recompute must see
    the forward's autocast dtype and dropout masks, or its gradients are not the forward's."""
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))

    def grads(offload: bool | None):
        model = _model()
        model.config.attention_dropout = 0.3
        for layer in decoder_layers(model):
            layer.self_attn.attention_dropout = 0.3
        if offload is not None:
            enable_activation_checkpointing(model, offload=offload)
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        torch.rand(100)  # the RNG moves on between forward and backward
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, offloaded, torch_ckpt = grads(None), grads(True), grads(False)
    for name, g in plain.items():
        assert torch.equal(offloaded[name], torch_ckpt[name]), name
        assert torch.allclose(offloaded[name], g, rtol=1e-2, atol=1e-4), name
    # the test has teeth: without dropout masks restored the gradients would differ
    assert any(not torch.equal(plain[n], grads_wo_dropout) for n, grads_wo_dropout in _no_dropout_grads(ids).items())


def _no_dropout_grads(ids):
    model = _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory and copy streams need a GPU")
def test_offloaded_checkpoints_on_the_gpu_equal_torchs_and_free_the_block_inputs():
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=512, hidden_size=1024, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=128)
    ids = torch.randint(0, 512, (4, 1024), device="cuda")
    results = {}
    for offload in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).cuda().bfloat16().train()
        enable_activation_checkpointing(model, offload=offload)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # frees blocks whose side-stream copies have finished (record_stream)
        after_forward = torch.cuda.memory_allocated() - base
        loss.backward()
        torch.cuda.synchronize()
        results[offload] = (after_forward, {n: p.grad.float() for n, p in model.named_parameters()})
    block_inputs = 8 * ids.numel() * cfg.hidden_size * 2  # 8 layers x (4 x 1024 x 1024) bf16
    assert results[False][0] - results[True][0] >= 0.9 * block_inputs, (results[False][0], results[True][0])
    for name, g in results[False][1].items():  # same bf16 math; attention's backward may accumulate atomically
        assert (results[True][1][name] - g).abs().max() <= 1e-2 * g.abs().max() + 1e-6, name
