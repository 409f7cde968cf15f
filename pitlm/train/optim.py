"""The optimizer: AdamW param groups (LoRA's fully trained modules at their own LR), torch AdamW or bitsandbytes'
8-bit AdamW (without its per-tensor device sync, with optional stochastic rounding of bf16 weights), the optimizer
step inside backward (pitlm.train.in_backward), and the LR schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pitlm.errors import PitlmError
from pitlm.train.in_backward import InBackwardOptimizer


def param_groups(model: nn.Module, cfg) -> list[dict[str, Any]]:
    """AdamW groups: matrices decay, vectors (norms, biases) do not; LoRA's fully trained modules (lm_head,
    embed_tokens) get their own smaller LR. Each group keeps `base_lr`; the schedule scales it."""
    lr = cfg.optim.lr
    full_lr = cfg.lora.full_modules_lr if cfg.lora.full_modules_lr is not None else lr / 10
    buckets: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "full_modules": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if cfg.mode == "lora" and "modules_to_save" in name:
            buckets["full_modules"].append(p)
        elif p.dim() >= 2:
            buckets["decay"].append(p)
        else:
            buckets["no_decay"].append(p)
    settings = {"decay": (lr, cfg.optim.weight_decay), "no_decay": (lr, 0.0),
                "full_modules": (full_lr, 0.0)}
    sr = cfg.optim.stochastic_round
    return [{"params": ps, "name": k, "lr": settings[k][0], "base_lr": settings[k][0], "weight_decay": settings[k][1],
             "stochastic_round": sr == "all" or (sr == "full_modules" and k == "full_modules")}
            for k, ps in buckets.items() if ps]


def build_optimizer(model: nn.Module, cfg):
    """AdamW (torch) or 8-bit AdamW (bitsandbytes) over `param_groups`; with optim.in_backward, one per parameter,
    stepped inside backward (pitlm.train.in_backward.InBackwardOptimizer)."""
    groups = param_groups(model, cfg)
    if not groups:
        raise PitlmError("no trainable parameters")
    kwargs = dict(betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    if cfg.optim.name == "adamw8bit":
        adamw8bit = bnb_adamw8bit_class()
        if cfg.optim.stochastic_round != "none" and not hasattr(adamw8bit, "sr_chunk"):
            raise PitlmError("optim.stochastic_round needs bitsandbytes >= 0.48 (this one's AdamW8bit lacks the "
                             "internals it calls); upgrade it or set optim.stochastic_round=none")
        make = lambda gs: adamw8bit(gs, **kwargs)  # noqa: E731
    else:
        fused = {"fused": True} if cfg.optim.fused else {}
        make = lambda gs: torch.optim.AdamW(gs, **kwargs, **fused)  # noqa: E731
    if cfg.optim.in_backward:
        return InBackwardOptimizer(groups, make)
    return make(groups)


def bnb_adamw8bit_class() -> type:
    """bitsandbytes' AdamW8bit with its step loop minus the device synchronisation it makes after every parameter.

    bitsandbytes (0.50) calls torch.cuda.synchronize() after each tensor's update, which only its paged optimizers
    need (pitlm's are not paged): on the seed's recipe that is 662 host-device round trips per step, the GPU idle in
    between, and inside backward (optim.in_backward) each one drains the queued backward work (BENCHMARKS.md,
    issue 9). Same kernels on the same stream, in the same order: the results are bitwise those of bitsandbytes'
    own step (tests/test_train_in_backward.py, on a GPU). Where bitsandbytes' internals differ from what this loop
    calls, its own step is used."""
    try:
        import bitsandbytes as bnb  # noqa: PLC0415 - optional dependency bitsandbytes
        from bitsandbytes import functional as F  # noqa: PLC0415 - optional dependency bitsandbytes
    except ImportError as e:
        raise PitlmError("optim.name=adamw8bit needs bitsandbytes: pip install bitsandbytes") from e

    base = bnb.optim.AdamW8bit
    needed = ("check_overrides", "to_gpu", "init_state", "update_step", "get_config")
    if not all(hasattr(base, n) for n in needed):
        return base

    class AdamW8bitNoSync(base):
        """Also: groups flagged `stochastic_round` update their bf16 params in fp32 and write them back with
        stochastic rounding (`_update_step_sr`)."""

        sr_chunk = SR_CHUNK  # elements per fp32 chunk; a multiple of bitsandbytes' 256-element state blocks
        sr_generator: torch.Generator | None = None  # None: torch's default generator of the param's device

        @torch.no_grad()
        def step(self, closure=None):
            if getattr(self, "is_paged", False) or not hasattr(self, "initialized"):
                return super().step(closure)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)
                    self.update_step(group, p, gindex, pindex)
            return loss

        @torch.no_grad()
        def update_step(self, group, p, gindex, pindex):
            if group.get("stochastic_round") and p.dtype == torch.bfloat16:
                return self._update_step_sr(group, p, gindex, pindex)
            return super().update_step(group, p, gindex, pindex)

        def _update_step_sr(self, group, p, gindex, pindex):
            """bitsandbytes' update_step, run on fp32 copies of the param and its gradient one chunk at a time (the
            temporaries of a 508 M-element lm_head stay at a few hundred MiB), each chunk written back to bf16 with
            stochastic rounding. The update kernels are elementwise within a 256-element state block, so chunking at
            block boundaries changes nothing: rounded to nearest instead, the result is bitsandbytes' own bf16 step bit
            for bit (tests/test_train_stochastic_round.py, on CPU and on an H200; with weight decay, bitsandbytes'
            CUDA bf16 kernel rounds twice, after the Adam step and after the decay, and this path once)."""
            config = self.get_config(gindex, pindex, group)
            # an update-norm limit (LAMB/LARS) needs the whole tensor at once; AdamW8bit never sets one
            assert config["max_unorm"] == 0.0 and self.sr_chunk % 256 == 0
            p.data = p.data.contiguous()
            state = self.state[p]
            state["step"] += 1
            flat, grad = p.data.view(-1), p.grad.contiguous().view(-1)
            for a in range(0, flat.numel(), self.sr_chunk):
                b = min(a + self.sr_chunk, flat.numel())
                p32 = flat[a:b].float()
                self._update_fp32(config, state, grad[a:b].float(), p32, a, b)
                flat[a:b].copy_(stochastic_round_bf16(p32, self.sr_generator))

        def _update_fp32(self, config, state, g32, p32, a, b):
            """The kernel call of bitsandbytes' Optimizer2State.update_step (same arguments) on elements [a, b)."""
            betas, step = config["betas"], state["step"]
            s1, s2 = state["state1"].view(-1)[a:b], state["state2"].view(-1)[a:b]
            common = dict(beta1=betas[0], beta2=betas[1], beta3=betas[2] if len(betas) >= 3 else 0.0,
                          alpha=config.get("alpha", 0.0), eps=config["eps"], step=step, lr=config["lr"],
                          weight_decay=config["weight_decay"], gnorm_scale=1.0, skip_zeros=config["skip_zeros"])
            if s1.dtype == torch.float32:  # tensors under min_8bit_size keep 32-bit state
                F.optimizer_update_32bit(self.optimizer_name, g32, p32, s1, state2=s2, **common)
            else:  # one absmax per 256-element block: [a, b) covers blocks a // 256 .. ceil(b / 256)
                blocks = slice(a // 256, -(-b // 256))
                F.optimizer_update_8bit_blockwise(self.optimizer_name, g32, p32, s1, s2, qmap1=state["qmap1"],
                                                  qmap2=state["qmap2"], absmax1=state["absmax1"][blocks],
                                                  absmax2=state["absmax2"][blocks], **common)

        def load_state_dict(self, state_dict, *args, **kwargs):
            # torch's load replaces each group's options with the checkpoint's: keep this run's config deciding
            # stochastic rounding (a checkpoint from before the option, or a resume that turns it on)
            flags = [g.get("stochastic_round", False) for g in self.param_groups]
            super().load_state_dict(state_dict, *args, **kwargs)
            for g, flag in zip(self.param_groups, flags, strict=True):
                g["stochastic_round"] = flag

    return AdamW8bitNoSync


# Elements per chunk of the stochastic-rounding update: fp32 param, gradient and rounding temporaries of 64 MiB each.
# On an H200, one step of a 509 M-element bf16 lm_head: bitsandbytes' own 14.3 ms; this path 28.0 ms and +304 MiB at
# 2**24, 40.3 ms and +76 MiB at 2**22, 26.7 ms and +1.2 GiB at 2**26.
SR_CHUNK = 1 << 24
BF16_MAX = torch.finfo(torch.bfloat16).max


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, |x| rounded to the bf16 above it with probability (|x| - below) / ulp: E[result] = x, so an update
    below half a bf16 ulp (lr 2e-5 on weights of ~0.02) still moves the weight on average; round-to-nearest drops it."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    # Adding uniform noise below the 16 bits bf16 drops, then dropping them, carries into the kept bits with exactly
    # that probability. Floats are sign-magnitude: on a negative number's int32 view the addition grows the
    # magnitude, i.e. rounds away from zero with that probability, as it must. Clamping first keeps finite values
    # finite (bf16's max has no low bits to carry from; values above it saturate there). inf and nan pass unchanged:
    # the noise would turn CUDA's nan (0x7FFFFFFF) into -0.0 by carrying into the sign bit.
    bits = x.clamp(-BF16_MAX, BF16_MAX).view(torch.int32).add_(noise).bitwise_and_(-(1 << 16))
    return torch.where(torch.isfinite(x), bits.view(torch.float32), x).bfloat16()


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine to min_ratio at total_steps. A pure function of the step: resuming needs
    no scheduler state."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
