"""torch.compile of the MoE blocks (`compile: moe`): the same loss and gradients as eager, through pitlm's grouped
expert-LoRA path and activation checkpointing; the grouped GEMMs stay out of the graph."""

import pytest
import torch

from pitlm.train.activations import compile_blocks, enable_activation_checkpointing
from pitlm.train.bench import bench_config
from pitlm.train.model import apply_lora, build_model_config, build_scratch_model, decoder_layers


def _lora_moe(offload: bool = False):
    cfg = bench_config(overrides=["model.arch=tiny-qwen3_5_moe", "optim.lr=1e-3"])
    config = build_model_config(cfg.model)
    torch.manual_seed(0)
    model = build_scratch_model(config, torch.float32, "cpu")
    enable_activation_checkpointing(model, offload=offload)
    return apply_lora(model, cfg.lora).train(), config


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids[:, :-1], labels=ids[:, 1:]).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_moe_blocks_give_eager_loss_and_gradients():
    from torch._dynamo.utils import counters

    model, config = _lora_moe(offload=True)
    ids = torch.randint(0, config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(3))
    eager_loss, eager = _loss_and_grads(model, ids)
    counters.clear()
    assert compile_blocks(model, "moe") == config.num_hidden_layers
    loss, grads = _loss_and_grads(model, ids)
    assert counters["stats"]["unique_graphs"] > 0  # dynamo did compile graphs (no silent eager fallback)
    assert all(layer.mlp._compiled_call_impl is not None for layer in decoder_layers(model))
    assert grads.keys() == eager.keys() and any("experts" in n for n in grads)
    assert loss == pytest.approx(eager_loss, rel=1e-6)
    for name, g in eager.items():
        assert torch.allclose(grads[name], g, rtol=1e-4, atol=1e-6), name


def test_compile_needs_moe_blocks_and_one_process():
    from pydantic import ValidationError

    from pitlm.errors import ConfigError
    from pitlm.train.config import TrainConfig, check_config
    from pitlm.train.model import build_model_config

    dense = build_scratch_model(build_model_config("tiny-qwen3"), torch.float32, "cpu")
    with pytest.raises(ConfigError, match="no MoE blocks"):
        compile_blocks(dense, "moe")
    with pytest.raises(ValidationError):
        TrainConfig(corpus="c", compile="layers")
    with pytest.raises(ConfigError, match="one process"):
        check_config(TrainConfig(corpus="c", mode="full", base="b", compile="moe"), world_size=2)
    with pytest.raises(ConfigError, match="one process"):
        check_config(TrainConfig(corpus="c", mode="full", base="b", gradient_checkpointing=True,
                                 gradient_checkpointing_offload=True), world_size=2)
    with pytest.raises(ConfigError, match="gradient_checkpointing: true"):
        check_config(TrainConfig(corpus="c", mode="lora", base="b", gradient_checkpointing_offload=True))
