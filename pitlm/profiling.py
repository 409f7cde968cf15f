"""One call under torch.profiler, its top operators written as tables (for `pitlm bench ... --profile`)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger("pitlm")


def profile_call(fn: Callable[[], object], path: str, on_gpu: bool, rows: int = 30) -> None:
    """Run `fn` once under torch.profiler; write to `path` its top operators by device (or CPU) time, then the
    same split by input shapes (which tensor sizes an operator's time goes to), then by own time and input shapes
    (the elementwise kernels behind a step's memory-bound time, each with its tensors)."""
    from torch.profiler import ProfilerActivity, profile

    from pitlm.volume import atomic_write_text

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        if on_gpu:
            torch.cuda.synchronize()
    key = "cuda_time_total" if on_gpu else "cpu_time_total"
    by_op = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
    by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=rows,
                                                                  max_name_column_width=60, max_shapes_column_width=90)
    self_key = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    by_self = prof.key_averages(group_by_input_shape=True).table(sort_by=self_key, row_limit=3 * rows,
                                                                 max_name_column_width=60,
                                                                 max_shapes_column_width=90)
    atomic_write_text(path, f"# by operator\n{by_op}\n\n# by operator and input shapes\n{by_shape}\n\n"
                            f"# by own (self) time and input shapes: which kernels, on which tensors\n{by_self}\n")
    log.info("profile (top %d operators by %s) -> %s", rows, key, path)
