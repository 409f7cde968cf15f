"""The optimizer step inside backward (pitlm.train.in_backward): same updates as the ordinary step, gradients freed
as they are produced, the config's refusals, the watchdog, checkpoints and the bench sweep."""

import pytest
import torch

from pitlm.errors import ConfigError
from pitlm.train.activations import enable_activation_checkpointing
from pitlm.train.checkpoint import load_checkpoint, save_checkpoint
from pitlm.train.config import TrainConfig, check_config
from pitlm.train.in_backward import InBackwardOptimizer
from pitlm.train.model import apply_lora, build_model_config, build_scratch_model
from pitlm.train.optim import build_optimizer
from pitlm.train.parallel import DistEnv
from pitlm.train.paths import ModelDir
from pitlm.train.step import NonFiniteLossError, train_step

VOCAB_LO, VOCAB_HI = 2, 258


def lora_setup(in_backward: bool, seed: int = 0, offload: bool = False):
    """The tiny hybrid Qwen3.5-MoE with the seed's LoRA list, lm_head + embed_tokens in full, activation
    checkpointing (offload: block inputs on the host, as lora-qwen35-35b-74gb): the 35B recipes in miniature."""
    torch.manual_seed(seed)
    model = build_scratch_model(build_model_config("tiny-qwen3.5-moe"), torch.float32)
    enable_activation_checkpointing(model, offload=offload)
    cfg = TrainConfig(mode="lora", corpus="c", base="b", optim={"lr": 1e-2, "grad_clip": 0.0,
                                                                 "in_backward": in_backward},
                      lora={"preset": "qwen3.5-moe", "full_modules_lr": 3e-3})
    model = apply_lora(model, cfg.lora)
    with torch.no_grad():  # random B: every adapter changes the output, so every gradient is non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.train()
    return model, build_optimizer(model, cfg), cfg


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(VOCAB_LO, VOCAB_HI, (2, 17), generator=g) for _ in range(n)]


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("offload", [False, True])
def test_in_backward_updates_equal_the_ordinary_step(offload):
    """Three steps with the chunked loss (lm_head used once per 8-token chunk) and activation checkpointing: every
    trainable parameter, the loss and the gradient norm equal the ordinary optimizer's. A hook that stepped once
    per contribution (per chunk) or before all of them arrived would differ. offload: the in-backward model's
    checkpointed blocks run as offloaded checkpoints (their parameters' hooks fire inside a nested backward)."""
    ref, ref_opt, _ = lora_setup(in_backward=False)
    model, opt, _ = lora_setup(in_backward=True, offload=offload)
    assert isinstance(opt, InBackwardOptimizer) and len(opt.optimizers) == len(trainable(model))
    before = trainable(model)
    for i, block in enumerate(batches(3)):
        r = train_step(ref, [block], ref_opt, step=i, grad_clip=0.0, ce_chunk=8)
        s = train_step(model, [block], opt, step=i, grad_clip=0.0, ce_chunk=8)
        assert s.loss == pytest.approx(r.loss, rel=1e-6)
        assert s.grad_norm == pytest.approx(r.grad_norm, rel=1e-5)
    got, want = trainable(model), trainable(ref)
    moved = [n for n in want if not torch.equal(want[n], before[n])]
    assert len(moved) == len(want)  # every parameter was updated, lm_head and embed_tokens included
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_in_backward_frees_each_gradient_before_the_next_exists():
    """When a parameter's update runs, it is the only trainable parameter holding a gradient; after the step none
    holds one."""
    model, opt, _ = lora_setup(in_backward=True)
    params = [p for p in model.parameters() if p.requires_grad]
    alive_at_update = []
    for sub in opt.optimizers:  # wrap each optimizer's step: it runs inside the hook, before the grad is freed
        step = sub.step

        def counted(*a, _step=step, **k):
            alive_at_update.append(sum(p.grad is not None for p in params))
            return _step(*a, **k)

        sub.step = counted
    result = train_step(model, batches(1), opt, grad_clip=0.0, ce_chunk=8)
    assert len(alive_at_update) == len(params) and set(alive_at_update) == {1}
    assert all(p.grad is None for p in params) and result.grad_norm > 0


def test_in_backward_lr_schedule_reaches_every_parameter():
    model, opt, cfg = lora_setup(in_backward=True)
    names = {g["name"] for g in opt.param_groups}
    assert names == {"decay", "full_modules"} or names == {"decay", "no_decay", "full_modules"}
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * 0.5
    lrs = {g["name"]: g["lr"] for sub in opt.optimizers for g in sub.param_groups}
    assert lrs["decay"] == pytest.approx(0.5e-2) and lrs["full_modules"] == pytest.approx(1.5e-3)


def test_watchdog_stops_a_nan_loss_before_any_update():
    model, opt, _ = lora_setup(in_backward=True)
    before = trainable(model)
    with pytest.raises(NonFiniteLossError) as err:
        train_step(model, batches(1), opt, step=3, grad_clip=0.0, inject_nan=True)
    assert err.value.exit_code == 42 and "loss" in str(err.value)
    after = trainable(model)
    assert all(torch.equal(after[n], before[n]) for n in before)


@pytest.mark.parametrize("change, message", [
    ({"optim": {"in_backward": True, "grad_clip": 1.0}}, "optim.grad_clip=0"),
    ({"optim": {"in_backward": True, "grad_clip": 0.0}, "grad_accum_steps": 2, "batch_size": 4}, "grad_accum_steps=1"),
    ({"optim": {"in_backward": True, "grad_clip": 0.0}, "mode": "full"}, "one process"),
])
def test_config_refuses_what_in_backward_cannot_do(change, message):
    cfg = TrainConfig(**{"mode": "lora", "corpus": "c", "base": "b", **change})
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        check_config(cfg)


def test_checkpoint_round_trip_resumes_the_same_run(tmp_path):
    """Save after 2 in-backward steps, load into a fresh model + optimizer, take step 3 on both: identical."""
    env = DistEnv(0, 1, 0, torch.device("cpu"), False)
    model, opt, _ = lora_setup(in_backward=True)
    data = batches(3)
    for i in range(2):
        train_step(model, [data[i]], opt, step=i, grad_clip=0.0)
    md = ModelDir(tmp_path / "m")
    path = save_checkpoint(md, 2, model, opt, {"tokens_seen": 0}, "x: 1\n", env, keep_last=1)
    fresh, fresh_opt, _ = lora_setup(in_backward=True)  # same frozen base (a LoRA checkpoint holds no base weights)
    with torch.no_grad():  # other trained weights: the load must set them
        for p in fresh.parameters():
            if p.requires_grad:
                p.add_(0.1)
    load_checkpoint(path, fresh, fresh_opt, env)
    a = train_step(model, [data[2]], opt, step=2, grad_clip=0.0)
    b = train_step(fresh, [data[2]], fresh_opt, step=2, grad_clip=0.0)
    assert a.loss == b.loss
    got, want = trainable(fresh), trainable(model)
    assert all(torch.equal(got[n], want[n]) for n in want)
    # the Adam moments came back too: a fresh optimizer's first step would move the weights differently
    moments = [s["exp_avg"] for sub in fresh_opt.optimizers for s in sub.state.values()]
    assert len(moments) == len(want) and all(m.abs().sum() > 0 for m in moments)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (bitsandbytes' 8-bit AdamW)")
def test_in_backward_with_8bit_adamw_equals_the_ordinary_step_on_a_gpu():
    """The recipe's optimizer (bitsandbytes AdamW8bit, bf16 weights and adapters) per parameter inside backward
    gives the updates of one AdamW8bit over all parameters: its block-wise state is per tensor either way."""
    pytest.importorskip("bitsandbytes")

    def setup(in_backward):
        torch.manual_seed(0)
        model = build_scratch_model(build_model_config("tiny-qwen3.5-moe"), torch.bfloat16, "cuda")
        enable_activation_checkpointing(model)
        cfg = TrainConfig(mode="lora", corpus="c", base="b",
                          optim={"name": "adamw8bit", "lr": 1e-2, "grad_clip": 0.0, "in_backward": in_backward},
                          lora={"preset": "qwen3.5-moe", "adapter_dtype": "base", "r": 64})
        model = apply_lora(model, cfg.lora)  # r=64: adapters of >= 4096 elements get 8-bit state
        model.train()
        return model, build_optimizer(model, cfg)

    ref, ref_opt = setup(False)
    model, opt = setup(True)
    before = trainable(model)
    for block in batches(3):
        r = train_step(ref, [block], ref_opt, grad_clip=0.0, autocast_dtype=torch.bfloat16, ce_chunk=8)
        s = train_step(model, [block], opt, grad_clip=0.0, autocast_dtype=torch.bfloat16, ce_chunk=8)
        assert s.loss == pytest.approx(r.loss, rel=1e-3)
    got, want = trainable(model), trainable(ref)
    assert sum(not torch.equal(want[n], before[n]) for n in want) > len(want) // 2
    for name in want:
        torch.testing.assert_close(got[name].float(), want[name].float(), rtol=2e-2, atol=1e-3, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (bitsandbytes' 8-bit AdamW)")
def test_adamw8bit_without_per_tensor_sync_is_bitwise_bitsandbytes():
    """pitlm's AdamW8bit (bitsandbytes' step loop without its torch.cuda.synchronize() per tensor) updates weights
    and 8-bit state exactly as bitsandbytes' own step."""
    bnb = pytest.importorskip("bitsandbytes")
    from pitlm.train.optim import bnb_adamw8bit_class

    cls = bnb_adamw8bit_class()
    assert cls is not bnb.optim.AdamW8bit and issubclass(cls, bnb.optim.AdamW8bit)
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(4096, 16), (16, 4096), (300, 7), (2048,)]
    ps = [torch.randn(s, device="cuda", generator=g).bfloat16() for s in shapes]
    a = [torch.nn.Parameter(p.clone()) for p in ps]
    b = [torch.nn.Parameter(p.clone()) for p in ps]
    opt_a, opt_b = cls(a, lr=1e-2), bnb.optim.AdamW8bit(b, lr=1e-2)
    for _ in range(3):
        grads = [torch.randn(s, device="cuda", generator=g).bfloat16() for s in shapes]
        for pa, pb, gr in zip(a, b, grads, strict=True):
            pa.grad, pb.grad = gr.clone(), gr.clone()
        opt_a.step()
        opt_b.step()
    for pa, pb, p0 in zip(a, b, ps, strict=True):
        assert torch.equal(pa, pb) and not torch.equal(pa, p0)
    for pa, pb in zip(a, b, strict=True):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))
