"""The optimizer step applied inside backward: each trainable parameter is updated by its own optimizer the moment
its gradient is complete, and the gradient is freed at once, so the gradients of all trainable parameters are never
alive together.

Why: on Qwen3.5-35B-A3B the seed's LoRA recipe trains 1.96 B parameters (942 M adapters + lm_head + embed_tokens in
full); their bf16 gradients are 3.65 GiB held from the end of backward until `optimizer.step()`, on top of 69 GiB of
weights, adapters and 8-bit AdamW state (BENCHMARKS.md). Freed as they are produced, only a layer's worth is alive.

What it costs, and why the config refuses some combinations (`pitlm.train.config.check_config`):
- global-norm clipping needs every gradient before any update: `optim.grad_clip` must be 0;
- gradient accumulation would step once per micro-batch: `grad_accum_steps` must be 1;
- the NaN/inf watchdog checks the loss before backward (the common failure), but a non-finite gradient under a finite
  loss is only seen after the updates it reached: the step raises, and the run resumes from its last checkpoint.

`torch.autograd` calls a post-accumulate-grad hook once per backward per leaf, after every contribution to it is
summed (also for lm_head under the chunked loss, which uses it once per chunk): tests/test_train_in_backward.py
checks the result equals the ordinary optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class InBackwardOptimizer:
    """One optimizer per trainable parameter (built by `make(param_groups)`), stepped by a post-accumulate-grad hook.

    Looks enough like a torch optimizer for pitlm's loop: `param_groups` (the per-parameter optimizers' groups, so an
    LR schedule reaches all of them), `step()` and `zero_grad()` (no-ops: the work happened in backward),
    `optimizers` (the list torch.distributed.checkpoint saves and loads by parameter name)."""

    def __init__(self, groups: list[dict[str, Any]], make: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]):
        self.optimizers: list[torch.optim.Optimizer] = []
        self.param_groups: list[dict[str, Any]] = []
        self._norms: list[torch.Tensor] = []
        self._handles = []
        for group in groups:
            for p in group["params"]:
                opt = make([{**group, "params": [p]}])
                self.optimizers.append(opt)
                self.param_groups.extend(opt.param_groups)
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(opt)))

    def _hook(self, opt: torch.optim.Optimizer) -> Callable[[nn.Parameter], None]:
        def step_now(p: nn.Parameter) -> None:
            grad = p.grad
            # its norm in fp32 without a host sync (one kernel; combined in take_grad_norm): the step's gradient norm
            # for the log and the watchdog
            self._norms.append(torch.linalg.vector_norm(grad.detach(), dtype=torch.float32))
            opt.step()
            p.grad = None  # the point of stepping here: this gradient's memory is released now

        return step_now

    def take_grad_norm(self) -> torch.Tensor:
        """The global L2 norm of the gradients applied since the last call (0 when none), and reset."""
        norm = torch.linalg.vector_norm(torch.stack(self._norms)) if self._norms else torch.zeros(())
        self._norms = []
        return norm

    def step(self, closure=None) -> None:  # noqa: ARG002 - torch's signature; each update already happened
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)
        self._norms = []

    def remove_hooks(self) -> None:
        """Detach from the parameters (a bench that builds several optimizers on one model)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def optimizers_of(optimizer) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
    """What torch.distributed.checkpoint's get/set_state_dict take for this optimizer (a list for in-backward)."""
    return optimizer.optimizers if isinstance(optimizer, InBackwardOptimizer) else optimizer
