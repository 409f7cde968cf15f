"""pitlm.kernels.profiling: a profiled step's device time by class, and the H100 projection drawn from it."""

from __future__ import annotations

import types

import pytest

from pitlm.kernels import profiling


def ev(key, us, shapes=(), device="DeviceType.CPU"):
    return types.SimpleNamespace(key=key, self_device_time_total=us, input_shapes=list(shapes), device_type=device)


def test_gemm_flops_and_bytes_from_recorded_shapes():
    big = profiling.gemm_flops_bytes("aten::mm", [[16384, 2048], [2048, 8192]])
    assert big == (2.0 * 16384 * 2048 * 8192, 2.0 * (16384 * 2048 + 2048 * 8192 + 16384 * 8192))
    lora_up = profiling.gemm_flops_bytes("aten::_grouped_mm", [[131072, 16], [256, 16, 2048], [256], [], []])
    assert lora_up == (2.0 * 131072 * 16 * 2048, 2.0 * (131072 * 16 + 256 * 16 * 2048 + 131072 * 2048))
    wgrad = profiling.gemm_flops_bytes("aten::_grouped_mm", [[16, 131072], [131072, 2048], [256], [], []])
    assert wgrad == (2.0 * 16 * 131072 * 2048, 2.0 * (16 * 131072 + 131072 * 2048 + 256 * 16 * 2048))
    acc = profiling.gemm_flops_bytes("aten::addmm_", [[16384, 2048], [16384, 16], [16, 2048], [], []])
    assert acc == (2.0 * 16384 * 16 * 2048, 2.0 * (16384 * 16 + 16 * 2048 + 16384 * 2048))
    assert profiling.gemm_flops_bytes("aten::_grouped_mm", [[4]]) is None
    slow = profiling.H200_BW / profiling.H100_BW
    assert profiling.gemm_slowdown(*big) == 1.0  # FLOPs bind on both GPUs
    assert profiling.gemm_slowdown(*lora_up) == pytest.approx(slow)  # bytes bind on both
    # the 35B's gate_up expert GEMM: bound by FLOPs on an H200, by a hair by bytes on an H100
    gate_up = profiling.gemm_flops_bytes("aten::_grouped_mm", [[131072, 2048], [256, 2048, 1024], [256], [], []])
    assert 1.0 < profiling.gemm_slowdown(*gate_up) < 1.05


def test_time_classes_and_the_projection():
    lora_bytes = 2.0 * (131072 * 16 + 256 * 16 * 2048 + 131072 * 2048)
    events = [
        ev("aten::mm", 4000, [[16384, 2048], [2048, 8192]]),  # bound by its FLOPs on both GPUs
        # the LoRA up-projection, bound by its bytes: 1.43x as long on an H100
        ev("aten::_grouped_mm", 2 * lora_bytes / profiling.H200_BW * 1e6,
           [[131072, 16], [256, 16, 2048], [256], [], []]),
        ev("aten::_cudnn_attention_backward", 500),
        ev("ChunkGatedDeltaRuleFunctionBackward", 1500),
        ev("aten::copy_", 2500, [[8, 2048, 2048], [8, 2048, 2048], []]),  # 2000 of it the pinned host copies
        ev("Memcpy DtoH (Device -> Pinned)", 1200, device="DeviceType.CUDA"),
        ev("Memcpy HtoD (Pinned -> Device)", 800, device="DeviceType.CUDA"),
        ev("nvjet_sm90_tst_192x192", 4000, device="DeviceType.CUDA"),  # kernel rows: their operators counted
        ev("cutlass_grouped", 2 * lora_bytes / profiling.H200_BW * 1e6, device="DeviceType.CUDA"),  # them
        ev("kernel_a", 2500, device="DeviceType.CUDA"),  # attention + delta rule + the device copy
        ev("launched_outside_any_operator", 500, device="DeviceType.CUDA"),  # -> other
        ev("aten::add_", 0),
    ]
    lora_ms = 2 * lora_bytes / profiling.H200_BW * 1e3
    slow = profiling.H200_BW / profiling.H100_BW
    classes = profiling.time_classes(events)
    assert classes == pytest.approx({"gemm": 4.0 + lora_ms, "gemm_h100": 4.0 + lora_ms * slow, "attention": 0.5,
                                     "delta_rule": 1.5, "host_copies": 2.0, "other": 1.0}, abs=0.01)
    low, high = profiling.h100_projection(classes)
    busy = 4.0 + lora_ms + 0.5 + 1.5 + 1.0
    assert low == pytest.approx((4.0 + lora_ms * slow + 0.5 + 1.0 * slow + 1.5) / busy, abs=2e-3)
    assert high == pytest.approx((4.0 + lora_ms * slow + 0.5 + (1.0 + 1.5) * slow) / busy, abs=2e-3)
    assert 1.0 < low < high < slow
    assert profiling.h100_projection(dict.fromkeys(classes, 0.0)) == (1.0, 1.0)


def test_bench_prints_the_classes_and_on_an_h200_the_projected_h100_range(monkeypatch):
    import torch

    from pitlm.train import bench

    classes = {"gemm": 4.0, "gemm_h100": 4.0, "attention": 1.0, "delta_rule": 2.0, "host_copies": 3.0,
               "other": 3.0}
    low, high = profiling.h100_projection(classes)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    out = bench._projection(classes, 1000.0, 1.0, "cuda:0")  # no busy time recorded: the whole step scales
    assert out["gpu_ms_other"] == 3.0 and out["gpu_ms_host_copies"] == 3.0
    assert out["h100_projected_tokens_per_second"] == f"{1000 / high:.0f}-{1000 / low:.0f}"
    # 0.8 s of the 1 s step busy on the device, 0.2 s waiting for the host: only the device's part grows
    out = bench._projection({**classes, "busy": 800.0, "idle": 300.0}, 1000.0, 1.0, "cuda:0")
    assert out["h100_projected_tokens_per_second"] == f"{1000 / (0.8 * high + 0.2):.0f}-{1000 / (0.8 * low):.0f}"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert "h100_projected_tokens_per_second" not in bench._projection(classes, 1000.0, 1.0, "cuda:0")
    assert bench._projection({}, 1000.0, 1.0, "cpu") == {}  # no profile, or a CPU one: nothing


def test_device_gaps_unions_streams_and_names_what_ended_each_gap():
    us = 1_000  # ns
    kernels = [  # (name, correlation id, start ns, end ns); two streams overlap, copies on the copy engines
        ("gemm", 1, 0, 100 * us),
        ("norm", 2, 50 * us, 150 * us),  # overlaps the gemm: busy 0..150
        ("Memcpy DtoH (Device -> Pinned)", 3, 150 * us, 400 * us),  # not compute: the gap stays a gap
        ("conv", 4, 200 * us, 260 * us),  # gap of 50 us before it
        ("tiny", 5, 265 * us, 270 * us),  # gap of 5 us: idle, but under the threshold
        ("conv", 6, 370 * us, 400 * us),  # gap of 100 us
        ("rope", 7, 430 * us, 440 * us),  # gap of 30 us
    ]
    launches = {4: "aten::item", 6: "aten::item"}.get
    out = profiling.device_gaps(kernels, launches, min_gap_us=20.0)
    assert out["span_ms"] == 0.44
    assert out["busy_ms"] == pytest.approx((150 + 60 + 5 + 30 + 10) / 1e3)
    assert out["idle_ms"] == pytest.approx((50 + 5 + 100 + 30) / 1e3)
    assert out["gaps"] == 3
    assert out["by_cause"] == [("aten::item", 0.15, 2), ("rope", 0.03, 1)]
    shuffled = profiling.device_gaps(kernels[::-1], launches, min_gap_us=20.0)
    assert shuffled == out  # order-free
    assert profiling.device_gaps([], None)["idle_ms"] == 0.0
