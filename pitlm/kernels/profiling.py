"""One call under torch.profiler, its top operators written as tables (for `pitlm bench ... --profile`), and its
device time split into classes that a GPU with other memory bandwidth would run at different speeds.

`time_classes(events)` sorts each operator's own device time into: GEMMs (each with its FLOPs and bytes from the
recorded shapes), attention, the delta rule (fla's kernels, partly tensor-core bound), copies to and from pinned host
memory (the offloaded checkpoints, on the copy engines, overlapped), and the rest (elementwise, norms, gathers,
Triton glue: memory-bound). `h100_projection(classes)` scales a step measured on an H200 to an H100 from that
split: both have the same SMs, clocks and bf16 peak, but 3.35 instead of 4.8 TB/s of HBM. So each GEMM slows by
its roofline (`gemm_slowdown`: x1 when its FLOPs bind, x1.43 when its bytes do, as a LoRA's rank-16 products),
attention keeps its time, the rest x 4.8 / 3.35 (an upper bound: latency-bound small kernels slow down less), and
the delta rule a range (x1 .. x1.43). `h100_step_range` adds the time the device waited for the host, which a
slower GPU does not lengthen. An estimate with stated assumptions (host copies still hidden; the same host CPU),
not a measurement.

`device_gaps(kernels, cpu_ops)` finds where the device sat idle inside a profiled call: the union of its kernels
over all streams (copies to and from pinned host memory left out: they run on the copy engines), the gaps between
them, and for each large gap the kernel after it and the host operator that launched that kernel late (the host
work the GPU waited on).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from pitlm.volume import atomic_write_text

log = logging.getLogger("pitlm")


H100_BW, H200_BW, H100_PEAK = 3.35e12, 4.8e12, 989e12  # bytes/s (HBM3 / HBM3e, SXM), bf16 dense FLOP/s
GEMMS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm")


def gemm_flops_bytes(name: str, shapes: list) -> tuple[float, float] | None:
    """(FLOPs, bytes moved at 2 bytes an element) of one GEMM call from its recorded input shapes, or None."""
    dims = [list(s) for s in shapes if isinstance(s, (list, tuple)) and len(s) >= 2]
    if name == "aten::_grouped_mm" and len(dims) >= 2:
        a, b = dims[0], dims[1]
        if len(a) == 2 and len(b) == 3:  # (M, K) x (G, K, N): each row block by its group's weight
            m, k, (g, _, n) = a[0], a[1], b
            return 2.0 * m * k * n, 2.0 * (m * k + g * k * n + m * n)
        if len(a) == 2 and len(b) == 2:  # (K, M) x (M, N) -> (G, K, N): the weight-gradient form
            groups = next((s[0] for s in shapes[2:3] if isinstance(s, (list, tuple)) and len(s) == 1), 1)
            k, m, n = a[0], a[1], b[1]
            return 2.0 * k * m * n, 2.0 * (k * m + m * n + groups * k * n)
        return None
    if name in ("aten::addmm", "aten::addmm_", "aten::baddbmm") and len(dims) >= 3:
        dims = dims[1:]  # the accumulator first
    if len(dims) < 2:
        return None
    a, b = dims[0], dims[1]
    batch = a[0] if len(a) == 3 else 1
    m, k, n = a[-2], a[-1], b[-1]
    return 2.0 * batch * m * k * n, 2.0 * batch * (m * k + k * n + m * n)


def gemm_slowdown(flops: float, nbytes: float) -> float:
    """How much longer a GEMM takes on an H100 than on an H200, by the roofline: its time is set by the larger of
    its FLOPs at the (shared) bf16 peak and its bytes at the HBM bandwidth, at the same efficiency on both."""
    compute, memory = flops / H100_PEAK, nbytes / H200_BW
    return max(compute, memory * H200_BW / H100_BW) / max(compute, memory)


def time_classes(events) -> dict[str, float]:
    """Own device time (ms) by class over `events` (torch.profiler key averages grouped by input shape: key,
    input_shapes, self_device_time_total in us, device_type): see the module docstring."""
    out = dict.fromkeys(("gemm", "gemm_h100", "attention", "delta_rule", "host_copies", "other"), 0.0)
    host = kernels = 0.0
    for e in events:
        us = float(getattr(e, "self_device_time_total", 0.0) or 0.0)
        name = e.key
        if str(getattr(e, "device_type", "DeviceType.CPU")) != "DeviceType.CPU":  # kernel rows repeat their
            # operator's time; only the copies to and from pinned host memory are counted from them
            kernels += us
            if name.startswith(("Memcpy DtoH (Device -> Pinned)", "Memcpy HtoD (Pinned -> Device)")):
                host += us
            continue
        if us <= 0:
            continue
        if name in GEMMS:
            fb = gemm_flops_bytes(name, e.input_shapes or [])
            out["gemm"] += us
            out["gemm_h100"] += us * gemm_slowdown(*fb) if fb else us * H200_BW / H100_BW
        elif "attention" in name.lower() and "delta" not in name.lower():
            out["attention"] += us
        elif "GatedDeltaRule" in name or "gated_delta_rule" in name:
            out["delta_rule"] += us
        else:
            out["other"] += us
    out["host_copies"] = host
    out["other"] = max(0.0, out["other"] - host)  # the pinned copies sit under aten::copy_ with the rest
    counted = sum(v for k, v in out.items() if k != "gemm_h100")
    out["other"] += max(0.0, kernels - counted)  # kernels launched outside any recorded operator
    return {k: round(v / 1e3, 2) for k, v in out.items()}


def h100_projection(classes: dict[str, float]) -> tuple[float, float]:
    """(low, high) factor by which an H200 step's device time grows on an H100 (module docstring)."""
    slow = H200_BW / H100_BW
    busy = sum(v for k, v in classes.items() if k not in ("host_copies", "gemm_h100", "idle", "busy"))
    if busy <= 0:
        return 1.0, 1.0
    fixed = classes["gemm_h100"] + classes["attention"] + classes["other"] * slow
    low = (fixed + classes["delta_rule"]) / busy
    high = (fixed + classes["delta_rule"] * slow) / busy
    return round(low, 3), round(high, 3)


def h100_step_range(classes: dict[str, float], step_seconds: float) -> tuple[float, float]:
    """(shortest, longest) seconds an H100 would take for a step measured at `step_seconds` on an H200, from the
    profiled step's classes with its device busy time (`busy`, ms: the union of its kernels, device_gaps).

    The step is device work plus the time the device waits for the host (launch overhead, synchronisations):
    idle = step_seconds - busy, measured unprofiled (the profiler's own host overhead inflates the profiled gaps).
    The device work grows by h100_projection's factors; the host's part does not grow with a slower GPU, and a
    slower GPU hides more of it behind queued work: at best all of it (busy x low), at worst none
    (busy x high + idle). Without `busy` (a profile from before it was recorded) the whole step is scaled."""
    low, high = h100_projection(classes)
    busy = classes.get("busy", 0.0) / 1e3
    if not 0 < busy <= step_seconds:
        return step_seconds * low, step_seconds * high
    return busy * low, busy * high + (step_seconds - busy)


COPY_ENGINE = ("Memcpy DtoH (Device -> Pinned)", "Memcpy HtoD (Pinned -> Device)")


def device_gaps(kernels: list[tuple[str, int, int, int]], cause: Callable[[int, str], str] | None = None,
                min_gap_us: float = 20.0, top: int = 12) -> dict:
    """Idle device time among `kernels` ((name, correlation id, start ns, end ns), any order, all streams).

    Busy time is the union of the kernel intervals (the device counts as busy while any kernel runs); idle time is
    the span from the first start to the last end less busy time. Gaps of at least `min_gap_us` are summed by what
    ended them: `cause(correlation id, kernel name)` of the next kernel, called for those kernels only (e.g. the host
    operator that launched it; by default the kernel's own name). Returns span_ms, busy_ms, idle_ms, gaps (count
    over the threshold) and `by_cause`: [(cause, total ms, count)], largest first."""
    spans = sorted((s, e, name, corr) for name, corr, s, e in kernels
                   if e > s and not name.startswith(COPY_ENGINE))
    if not spans:
        return {"span_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0, "gaps": 0, "by_cause": []}
    busy, causes, count = 0, {}, 0
    cur_s, cur_e = spans[0][0], spans[0][1]
    for s, e, name, corr in spans[1:]:
        if s > cur_e:  # a gap: the device had nothing to run until this kernel
            busy += cur_e - cur_s
            gap = s - cur_e
            if gap >= min_gap_us * 1e3:
                what = cause(corr, name) if cause else name
                total, n = causes.get(what, (0, 0))
                causes[what] = (total + gap, n + 1)
                count += 1
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = max(e for _, e, _, _ in spans) - spans[0][0]
    ranked = sorted(causes.items(), key=lambda kv: -kv[1][0])[:top]
    return {"span_ms": round(span / 1e6, 3), "busy_ms": round(busy / 1e6, 3),
            "idle_ms": round((span - busy) / 1e6, 3), "gaps": count,
            "by_cause": [(c, round(t / 1e6, 3), n) for c, (t, n) in ranked]}


def _kineto_gaps(prof) -> dict:
    """device_gaps over a finished torch.profiler run: kernels from its device events; each kernel's cause is the
    innermost host operator around the runtime call (cudaLaunchKernel and the like) with the kernel's correlation
    id."""
    events = prof.profiler.kineto_results.events()
    kernels, runtime, ops = [], {}, []
    for e in events:
        if str(e.device_type()) != "DeviceType.CPU":
            kernels.append((e.name(), e.correlation_id(), e.start_ns(), e.start_ns() + e.duration_ns()))
        elif e.name().startswith(("cuda", "cu")) and e.correlation_id():
            runtime[e.correlation_id()] = (e.start_ns(), e.start_thread_id())
        else:
            ops.append((e.start_ns(), e.start_ns() + e.duration_ns(), e.start_thread_id(), e.name()))
    by_thread: dict[int, list] = {}
    for op in sorted(ops):
        by_thread.setdefault(op[2], []).append(op)
    starts = {th: [op[0] for op in v] for th, v in by_thread.items()}

    def launched_by(corr: int, name: str) -> str:
        if corr not in runtime:
            return name
        t, thread = runtime[corr]
        i = bisect.bisect_right(starts.get(thread, []), t) - 1
        while i >= 0:  # nested operators: the latest-starting one that still contains t is the innermost
            if by_thread[thread][i][1] >= t:
                return by_thread[thread][i][3]
            i -= 1
        return name

    return device_gaps(kernels, launched_by)


def profile_call(fn: Callable[[], object], path: str, on_gpu: bool, rows: int = 30) -> dict[str, float]:
    """Run `fn` once under torch.profiler; write to `path` its top operators by device (or CPU) time, then the
    same split by input shapes (which tensor sizes an operator's time goes to), then by own time and input shapes
    (the elementwise kernels behind a step's memory-bound time, each with its tensors), then the device time by
    class. Returns the classes (ms; empty on a CPU)."""
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
    averages = prof.key_averages(group_by_input_shape=True)
    by_self = averages.table(sort_by=self_key, row_limit=3 * rows, max_name_column_width=60,
                             max_shapes_column_width=90)
    classes = time_classes(averages) if on_gpu else {}
    lines = "".join(f"{k}_ms: {v}\n" for k, v in classes.items())
    if on_gpu:
        gaps = _kineto_gaps(prof)
        classes["idle"], classes["busy"] = gaps["idle_ms"], gaps["busy_ms"]
        lines += (f"\n# device idle inside the call (pitlm.kernels.profiling.device_gaps)\nspan_ms: {gaps['span_ms']}\n"
                  f"busy_ms: {gaps['busy_ms']}\nidle_ms: {gaps['idle_ms']}\ngaps_over_20us: {gaps['gaps']}\n"
                  + "".join(f"{ms:9.3f} ms {n:6d} gaps before a kernel launched by {cause}\n"
                            for cause, ms, n in gaps["by_cause"]))
    atomic_write_text(path, f"# by operator\n{by_op}\n\n# by operator and input shapes\n{by_shape}\n\n"
                            f"# by own (self) time and input shapes: which kernels, on which tensors\n{by_self}\n\n"
                            f"# own device time by class (pitlm.kernels.profiling.time_classes)\n{lines}")
    log.info("profile (top %d operators by %s) -> %s", rows, key, path)
    return classes
