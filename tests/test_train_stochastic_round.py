"""Stochastic rounding of the bf16 write-back in pitlm's 8-bit AdamW (optim.stochastic_round): the chunked fp32
update is bitsandbytes' own, the rounding is unbiased where round-to-nearest drops small updates, the trajectory
tracks an fp32-master run, and the config/param-group plumbing."""

import pytest
import torch

import pitlm.train.optim as optim_mod
from pitlm.errors import ConfigError
from pitlm.train.config import TrainConfig
from pitlm.train.in_backward import InBackwardOptimizer
from pitlm.train.model import apply_lora, build_model_config, build_scratch_model
from pitlm.train.optim import build_optimizer
from pitlm.train.step import train_step

BF16_MAX = torch.finfo(torch.bfloat16).max


def sr_adamw8bit(params, seed: int = 0, **kwargs):
    """pitlm's AdamW8bit with every param in one stochastic-rounding group, seeded."""
    opt = optim_mod.bnb_adamw8bit_class()([{"params": params, "stochastic_round": True}], **kwargs)
    opt.sr_generator = torch.Generator(device=params[0].device).manual_seed(seed)
    return opt


def run(params: list[torch.Tensor], opt_for, grads: list[list[torch.Tensor]]):
    """Copies of `params` stepped by `opt_for(copies)` with each step's gradients; returns them and the optimizer."""
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = opt_for(ps)
    for step_grads in grads:
        for p, g in zip(ps, step_grads, strict=True):
            p.grad = g.to(p.dtype)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU (bitsandbytes' CUDA kernels)"))])
def test_chunked_fp32_update_is_bitwise_bitsandbytes_with_round_to_nearest(monkeypatch, device):
    """With the write-back rounded to nearest (what bitsandbytes' bf16 kernels do: on CPU `p.data.copy_(p_fp32)`), the
    chunked fp32 path gives bitsandbytes' own bf16 AdamW8bit step bit for bit over 3 steps, weights and state:
    11137 elements (8-bit state) in chunks of 512 end on a partial chunk and a partial 256-element block; 350
    elements take the 32-bit state path. Chunks misaligned with the blocks' absmax, or a step counted twice, differ.

    On CUDA (H200, bitsandbytes 0.50.2), with weight_decay=0 (the full_modules group's, and the LoRA recipe's):
    absmax2 (the block maxima of Adam's second moment) may differ in its last fp32 bit, which bitsandbytes' own kernel
    also does between bf16 and fp32 weights (its two instantiations' float arithmetic differs; the quantized states
    agree). With weight decay its bf16 kernel rounds the weight to bf16 twice (after the Adam step, again after the
    decay) where the fp32 path rounds once: up to a bf16 ulp apart, not compared here."""
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(optim_mod, "stochastic_round_bf16", lambda x, generator=None: x.bfloat16())
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(37, 301), (50, 7)]
    ps = [(torch.randn(s, device=device, generator=g) * 0.02).bfloat16() for s in shapes]
    grads = [[torch.randn(s, device=device, generator=g).bfloat16() for s in shapes] for _ in range(3)]
    kw = dict(lr=1e-2, weight_decay=1e-2 if device == "cpu" else 0.0)

    def chunked(params):
        opt = sr_adamw8bit(params, **kw)
        opt.sr_chunk = 512
        return opt

    got, opt_got = run(ps, chunked, grads)
    want, opt_want = run(ps, lambda xs: bnb.optim.AdamW8bit(xs, **kw), grads)
    assert [opt_got.state[p]["state1"].dtype for p in got] == [torch.uint8, torch.float32]
    for pa, pb, p0 in zip(got, want, ps, strict=True):
        assert torch.equal(pa, pb) and not torch.equal(pa, p0)
        sa, sb = opt_got.state[pa], opt_want.state[pb]
        assert sa["step"] == sb["step"] == 3
        for k in sa:
            if k == "absmax2" and device == "cuda":
                torch.testing.assert_close(sa[k], sb[k], rtol=2.4e-7, atol=0)  # two fp32 ulps at most, one seen
            elif isinstance(sa[k], torch.Tensor):
                assert torch.equal(sa[k], sb[k]), k


def test_unflagged_params_keep_bitsandbytes_update():
    """A group without the flag, and an fp32 param in a flagged group, take bitsandbytes' own update_step."""
    bnb = pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(1)
    ps = [(torch.randn(64, 80, generator=g) * 0.02).bfloat16(), torch.randn(64, 80, generator=g) * 0.02]
    grads = [[torch.randn(64, 80, generator=g) for _ in ps] for _ in range(2)]
    cls = optim_mod.bnb_adamw8bit_class()
    got = run(ps, lambda xs: cls([{"params": xs[:1]}, {"params": xs[1:], "stochastic_round": True}], lr=1e-6),
              grads)[0]
    want = run(ps, lambda xs: bnb.optim.AdamW8bit(xs, lr=1e-6), grads)[0]
    assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True))


def test_stochastic_round_bf16_edges():
    """Exact bf16 values stay; a value between two bf16 neighbours lands on one of them; finite values stay finite
    (fp32's max saturates at bf16's max, not inf); inf, -inf, nan and -0.0 pass through."""
    x = torch.tensor([1.0, -1.5, 1.0 + 2**-9, -(1.0 + 2**-9), torch.finfo(torch.float32).max,
                      -torch.finfo(torch.float32).max, BF16_MAX, float("inf"), float("-inf"), float("nan"), -0.0])
    for seed in range(20):
        y = optim_mod.stochastic_round_bf16(x, torch.Generator().manual_seed(seed)).float()
        assert y[:2].tolist() == [1.0, -1.5]
        assert y[2].item() in (1.0, 1.0 + 2**-7) and y[3].item() in (-1.0, -(1.0 + 2**-7))
        assert y[4:7].tolist() == [BF16_MAX, -BF16_MAX, BF16_MAX]
        assert y[7].item() == float("inf") and y[8].item() == float("-inf") and y[9].isnan()
        assert y[10].item() == 0.0 and torch.signbit(y[10])


def small_update_runs(lr: float, steps: int, n: int = 1 << 16):
    """bf16 weights ~ N(0, 0.02) and a noisy gradient of mostly positive sign (so updates add up over steps and their
    mean is not 0): an fp32-master run, a bf16 run rounded to nearest (bitsandbytes' own) and a bf16 run rounded
    stochastically, all with bitsandbytes' 8-bit state (identical in the three: no weight decay)."""
    bnb = pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(0)
    p0 = (torch.randn(n, generator=g) * 0.02).bfloat16()
    direction = 0.5 + torch.rand(n, generator=g)
    grads = [[direction + 0.5 * torch.randn(n, generator=g)] for _ in range(steps)]
    kw = dict(lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    fp32 = run([p0.float()], lambda xs: bnb.optim.AdamW8bit(xs, **kw), grads)[0][0].detach()
    rne = run([p0], lambda xs: bnb.optim.AdamW8bit(xs, **kw), grads)[0][0].detach().float()
    sr = run([p0], lambda xs: sr_adamw8bit(xs, **kw), grads)[0][0].detach().float()
    return p0.float(), fp32, rne, sr


def test_stochastic_rounding_is_unbiased_where_round_to_nearest_drops_the_update():
    """One step of lr 1e-6 (every element's Adam step is ~lr, far below half the ~1e-4 ulp of a 0.02 weight):
    round-to-nearest leaves nearly all weights unchanged; stochastic rounding moves a few by a whole ulp, and the
    mean of (new - old) equals the fp32 update's mean within 4 standard errors of SR's rounding noise, over all
    weights and over positive and negative ones apart (the update shrinks the ones and grows the others: a rounding
    that mishandled the sign would be biased in opposite directions, which the overall mean could hide)."""
    p0, fp32, rne, sr = small_update_runs(lr=1e-6, steps=1, n=1 << 18)
    u = fp32 - p0
    err = (sr - p0) - u  # SR's rounding error per element
    se = err.std().item() / err.numel() ** 0.5
    for part in (p0 > 0, p0 < 0):
        assert abs(err[part].mean().item()) < 4 * err[part].std().item() / part.sum().item() ** 0.5
    changed_rne, changed_sr = (rne != p0).float().mean().item(), (sr != p0).float().mean().item()
    print(f"\n[b] fp32 mean update {u.mean().item():.4e}; SR mean {(sr - p0).mean().item():.4e} (se {se:.2e}); "
          f"RNE mean {(rne - p0).mean().item():.4e}; changed: SR {changed_sr:.4f}, RNE {changed_rne:.4f}")
    assert changed_rne < 0.03 and changed_rne < changed_sr < 0.1
    assert abs(err.mean().item()) < 4 * se
    assert abs(((rne - p0) - u).mean().item()) > 20 * se  # the test can tell: round-to-nearest is biased here


def test_stochastic_rounding_tracks_fp32_master_weights_over_20_steps():
    """20 steps at the recipe's full_modules_lr 2e-5, betas 0.9/0.95: SR stays closer to the fp32-master weights
    than round-to-nearest, and its update along the gradient direction matches fp32's where RNE's falls short."""
    p0, fp32, rne, sr = small_update_runs(lr=2e-5, steps=20)
    gap_sr, gap_rne = (sr - fp32).abs().mean().item(), (rne - fp32).abs().mean().item()
    along = {k: ((v - p0) * (fp32 - p0).sign()).mean().item() for k, v in (("fp32", fp32), ("sr", sr), ("rne", rne))}
    size = {k: (v - p0).abs().mean().item() for k, v in (("fp32", fp32), ("sr", sr), ("rne", rne))}
    print(f"\n[c] mean |p - p_fp32|: SR {gap_sr:.3e}, RNE {gap_rne:.3e}; mean update along fp32's: "
          + ", ".join(f"{k} {v:.3e}" for k, v in along.items()) + "; mean |update|: "
          + ", ".join(f"{k} {v:.3e}" for k, v in size.items()))
    assert gap_sr < 0.6 * gap_rne
    assert along["sr"] == pytest.approx(along["fp32"], rel=0.05)
    assert along["rne"] < 0.5 * along["fp32"]
    assert size["sr"] == pytest.approx(size["fp32"], rel=0.2) and size["rne"] < 0.5 * size["fp32"]


def test_stochastic_round_needs_8bit_adamw():
    with pytest.raises(ConfigError, match=r"optim\.stochastic_round=full_modules with optim\.name=adamw: .*adamw8bit"):
        TrainConfig(mode="lora", corpus="c", base="b", optim={"stochastic_round": "full_modules"})


def tiny_lora(stochastic_round: str, in_backward: bool = False):
    torch.manual_seed(0)
    model = build_scratch_model(build_model_config("tiny-qwen3.5-moe"), torch.bfloat16)
    cfg = TrainConfig(mode="lora", corpus="c", base="b",
                      optim={"name": "adamw8bit", "stochastic_round": stochastic_round, "grad_clip": 0.0,
                             "in_backward": in_backward},
                      lora={"preset": "qwen3.5-moe", "adapter_dtype": "base"})
    return apply_lora(model, cfg.lora), cfg


@pytest.mark.parametrize("in_backward", [False, True])
def test_training_step_rounds_exactly_the_full_modules_group_stochastically(in_backward):
    """build_optimizer with stochastic_round=full_modules flags lm_head / embed_tokens' group alone, also through
    in_backward's per-parameter optimizers (built from copies of the group dicts). In a training step the seed of the
    rounding noise then changes those two weights and nothing else (the adapters keep bitsandbytes' update)."""
    pytest.importorskip("bitsandbytes")
    batch = torch.randint(2, 258, (2, 17), generator=torch.Generator().manual_seed(1))
    after = []
    for seed in (0, 1):
        model, cfg = tiny_lora("full_modules", in_backward)
        opt = build_optimizer(model, cfg)
        assert isinstance(opt, InBackwardOptimizer) == in_backward
        flags = {(g["name"], g["stochastic_round"]) for g in opt.param_groups}
        assert flags == {("decay", False), ("full_modules", True)} | ({("no_decay", False)} & flags)
        for sub in opt.optimizers if in_backward else [opt]:
            sub.sr_generator = torch.Generator().manual_seed(seed)
        train_step(model, [batch], opt, grad_clip=0.0, ce_chunk=8)
        after.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    full = [n for n in after[0] if "modules_to_save" in n]
    assert len(full) == 2 and all(after[0][n].dtype == torch.bfloat16 for n in full)
    assert all(not torch.equal(after[0][n], after[1][n]) for n in full)
    assert all(torch.equal(after[0][n], after[1][n]) for n in after[0] if n not in full)


def test_stochastic_round_all_flags_every_group():
    model, cfg = tiny_lora("all")
    assert all(g["stochastic_round"] for g in optim_mod.param_groups(model, cfg))


def test_load_state_dict_keeps_this_runs_stochastic_round_flags():
    """A checkpoint's param groups (saved with rounding off, or from before the option) do not switch it off."""
    pytest.importorskip("bitsandbytes")
    cls = optim_mod.bnb_adamw8bit_class()
    p = torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
    old = cls([{"params": [p]}])  # no flag, as a checkpoint written before the option
    new = cls([{"params": [p], "stochastic_round": True}])
    new.load_state_dict(old.state_dict())
    assert new.param_groups[0]["stochastic_round"] is True
