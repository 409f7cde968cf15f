"""Checkpoints: torch.distributed.checkpoint (DCP) for every mode, so one format serves a laptop run and an
8-GPU FSDP2 run. Each rank writes its own shard; nothing is gathered in the job (the seed's in-job gather hit the
NCCL watchdog). `pitlm merge` turns a checkpoint into an HF directory in a separate single-process step.

    checkpoints/step_000500/
        dcp/                 model (trainable parameters only: a LoRA checkpoint holds the adapter, not 35 B
                             frozen weights) and optimizer state, one .distcp file per rank
        rng_rank<r>.pt       each rank's RNG states (torch, CUDA, numpy, python)
        trainer_state.json   step, tokens seen, last losses
        train_config.yaml    the resolved config

A checkpoint is written under a temporary name and renamed into place by rank 0 after every rank finished, so a
visible step_XXXXXX is complete; the oldest beyond keep_last are then removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pitlm.train.in_backward import optimizers_of
from pitlm.train.parallel import DistEnv, barrier, broadcast_object
from pitlm.train.paths import ModelDir
from pitlm.volume import atomic_write_json, atomic_write_text

log = logging.getLogger("pitlm.train")


@contextlib.contextmanager
def _quiet_dcp():
    """DCP warns that it runs single-process when no process group exists; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*Detected an existing checkpoint.*")
        yield


def _state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kw)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(md: ModelDir, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], config_yaml: str, env: DistEnv, keep_last: int) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = md.checkpoint(step)
    tmp = final.parent / f".{final.name}.tmp"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(env)
    model_sd, optim_sd = get_state_dict(model, optimizers_of(optimizer), options=_state_dict_options())
    with _quiet_dcp():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    torch.save(rng_state(), tmp / f"rng_rank{env.rank}.pt")
    barrier(env)
    if env.is_main:
        atomic_write_json(tmp / "trainer_state.json", {**trainer_state, "step": step, "world_size": env.world_size})
        atomic_write_text(tmp / "train_config.yaml", config_yaml)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in md.list_checkpoints()[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    env: DistEnv) -> dict[str, Any]:
    """Restore model (trainable part), optimizer and this rank's RNG; returns trainer_state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    state = json.loads((path / "trainer_state.json").read_text())
    if optimizer is None:
        load_model_weights(path, model)
        return state
    model_sd, optim_sd = get_state_dict(model, optimizers_of(optimizer), options=_state_dict_options())
    payload = {"model": model_sd, "optim": optim_sd}
    with _quiet_dcp():
        dcp.load(payload, checkpoint_id=str(path / "dcp"))
    result = set_state_dict(model, optimizers_of(optimizer), model_state_dict=payload["model"], optim_state_dict=payload["optim"],
                            options=_state_dict_options(strict=False))
    _check_loaded(model, result, path)
    rng_file = path / f"rng_rank{env.rank}.pt"
    if rng_file.is_file() and state.get("world_size") == env.world_size:
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Load a checkpoint's model entries into a plain (single-process) model: the merge path."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model_sd = get_model_state_dict(model, options=_state_dict_options())
    payload = {"model": model_sd}
    with _quiet_dcp():
        dcp.load(payload, checkpoint_id=str(path / "dcp"))
    result = set_model_state_dict(model, payload["model"], options=_state_dict_options(strict=False))
    _check_loaded(model, result, path)


def _check_loaded(model: nn.Module, result, path: Path) -> None:
    """Loading is non-strict only about frozen parameters (a LoRA checkpoint holds no base weights)."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    missing = [k for k in result.missing_keys if k not in frozen]
    assert not missing and not result.unexpected_keys, (path, missing[:5], result.unexpected_keys[:5])


def latest_checkpoint(md: ModelDir, env: DistEnv) -> Path | None:
    """Rank 0 decides (a listing may race with a rename on a shared filesystem) and tells the others."""
    found = md.latest_checkpoint() if env.is_main else None
    return broadcast_object(found, env)
