"""pitlm.train.assembly: `pitlm train` and `pitlm bench train` build their model through one `assemble`, in one
order (fast kernels -> activation checkpointing -> LoRA -> compile), from a TrainConfig."""

import pytest
import torch

from pitlm.errors import ConfigError
from pitlm.train import assembly
from pitlm.train.bench import Sweep, bench_config, bench_train
from pitlm.train.model import build_model_config, build_scratch_model, decoder_layers
from pitlm.train.parallel import DistEnv


class _CpuSource:
    """A ModelSource that builds on the CPU whatever device the assembly is told (the GPU branch, without a GPU)."""

    def __init__(self, config):
        self.config = config

    def build(self, device):
        return build_scratch_model(self.config, torch.float32, "cpu")


def test_assemble_applies_kernels_then_checkpointing_then_lora_then_compile(monkeypatch):
    calls = []

    def record(name, real=None):
        def step(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs) if real else ["fake-kernel x1"]
        return step

    monkeypatch.setattr(assembly, "install_fast_kernels", record("kernels"))
    monkeypatch.setattr(assembly, "enable_activation_checkpointing",
                        record("checkpointing", assembly.enable_activation_checkpointing))
    monkeypatch.setattr(assembly, "apply_lora", record("lora", assembly.apply_lora))
    monkeypatch.setattr(assembly, "compile_blocks", record("compile", assembly.compile_blocks))
    cfg = bench_config(overrides=["gradient_checkpointing_skip_last=1", "lora.full_modules=[]"])
    env = DistEnv(0, 1, 0, torch.device("cuda"), False)  # the one-GPU branch: kernels are installed
    built = assembly.assemble(_CpuSource(build_model_config(cfg.model)), cfg, env, fsdp=False)
    assert calls == ["kernels", "checkpointing", "lora", "compile"]
    assert built.fast_kernels == ["fake-kernel x1"] and built.lora is not None and built.model.training
    assert built.total_params < sum(p.numel() for p in built.model.parameters())  # counted before the adapters
    layers = decoder_layers(built.model)
    assert [layer.gradient_checkpointing for layer in layers] == [True] * (len(layers) - 1) + [False]
    # peft saw a checkpointed model: it hooked the embeddings' output to require grad
    assert getattr(built.model.get_base_model(), "_require_grads_hook", None) is not None


def test_bench_config_reads_a_recipe_and_train_config_overrides(tmp_path):
    cfg = bench_config()  # the bench's defaults: LoRA on the tiny MoE hybrid, its preset picked by the arch
    assert cfg.mode == "lora" and cfg.lora.preset == "qwen3.5-moe" and cfg.gradient_checkpointing
    assert bench_config(overrides=["model.arch=tiny-qwen3"]).lora.preset == "dense"
    cfg = bench_config("lora-qwen35-35b-74gb", ["model.arch=tiny-qwen3.5-moe", "model.num_hidden_layers=2"])
    assert cfg.optim.in_backward and cfg.gradient_checkpointing_offload and cfg.lora.full_modules == []
    assert cfg.model == {"arch": "tiny-qwen3.5-moe", "num_hidden_layers": 2}
    with pytest.raises(ConfigError, match="--set model.num_hidden_layers=2"):
        bench_config(overrides=["num_hidden_layers=2"])
    with pytest.raises(ConfigError, match="pass --arch"):
        bench_config("lora-qwen35-35b-74gb")


def test_bench_checks_every_combination_with_the_trainers_rules_before_building():
    cfg = bench_config(overrides=["seq_len=16", "device=cpu", "grad_accum_steps=2"])
    with pytest.raises(ConfigError, match="grad_accum_steps=1"):
        bench_train(cfg, Sweep(batch_size=[1], in_backward=[False, True]), steps=1, warmup=0)
    with pytest.raises(ConfigError, match="less than one sequence per rank"):  # 1 // (1 rank x 2 micro-batches)
        bench_train(cfg, steps=1, warmup=0)
    with pytest.raises(ConfigError, match="mode lora or full"):
        bench_train(cfg.model_copy(update={"mode": "scratch"}))
