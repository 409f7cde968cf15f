"""Activation checkpointing granularity: the last N decoder blocks may keep their activations (no recompute)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from pitlm.train.model import decoder_layers
from pitlm.train.parallel import enable_activation_checkpointing


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
