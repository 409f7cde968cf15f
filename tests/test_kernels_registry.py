"""pitlm.kernels.registry: every fast path's switch is one FastPath, and set_fast_path / fast_path_switches go
through them."""

from __future__ import annotations

import pytest
from torch import nn

from pitlm.kernels.install import fast_path_switches, set_fast_path
from pitlm.kernels.registry import FAST_PATHS, PARTIAL_ROPE, ROUTER_TOPK, fast_path


def test_every_switch_is_one_registered_path_with_an_attribute_of_its_own():
    assert fast_path_switches() == {name: path.attr for name, path in FAST_PATHS.items()}
    attrs = [path.attr for path in FAST_PATHS.values() if path.attr]
    assert len(set(attrs)) == len(attrs) == len(FAST_PATHS) - 1  # rope alone is process-wide
    assert all(fast_path(name) is path and path.installer.startswith("pitlm.kernels.")
               for name, path in FAST_PATHS.items())


def test_set_fast_path_switches_the_modules_that_carry_it_and_refuses_unknown_names():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.ReLU())
    for m in model[:2]:
        setattr(m, ROUTER_TOPK.attr, True)
    assert set_fast_path(model, "router", False) == 2
    assert not ROUTER_TOPK.is_on(model[0]) and not ROUTER_TOPK.is_on(model[1])
    assert not ROUTER_TOPK.is_on(model[2]) and ROUTER_TOPK.is_on(model[2], default=True)  # never installed there
    with pytest.raises(ValueError, match="unknown fast path 'nope'; known: routed-experts, lora-in-k"):
        set_fast_path(model, "nope", True)


def test_the_rope_switch_belongs_to_the_process(monkeypatch):
    monkeypatch.setattr(PARTIAL_ROPE, "process_on", True)
    set_fast_path(nn.Linear(2, 2), "rope", False)
    assert not PARTIAL_ROPE.is_on() and not PARTIAL_ROPE.is_on(nn.Linear(2, 2), default=True)
