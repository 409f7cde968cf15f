"""Checkpoints: torch.distributed.checkpoint (DCP) for every mode, so one format serves a laptop run and an
8-GPU FSDP2 run. Each rank writes its own shard; nothing is gathered in the job (the seed's in-job gather hit the
NCCL watchdog). `pitlm merge` turns a checkpoint into an HF directory in a separate single-process step.

    checkpoints/step_000500/
        dcp/                 model (trainable parameters only: a LoRA checkpoint holds the adapter, not 35 B
                             frozen weights) and optimizer state, one .distcp file per rank
        rng_rank<r>.pt       each rank's RNG states (torch, CUDA, numpy, python)
        trainer_state.json   step, tokens seen, last losses
        train_config.yaml    the resolved config
        files.json           every other file's size and sha256, written last (what `--resume` verifies)

A checkpoint is written under a temporary name and renamed into place by rank 0 after every rank finished, so a
visible step_XXXXXX is complete; the oldest beyond keep_last are then removed. A visible checkpoint can still be
damaged later (a truncated copy, a full disk on an object-storage mount, a bad sector): `--resume` verifies the
newest one against its files.json and falls back to the newest intact one, saying which file was bad.
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
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from pitlm.train.in_backward import optimizers_of
from pitlm.train.parallel import DistEnv, barrier, broadcast_object
from pitlm.train.paths import ModelDir
from pitlm.volume import atomic_write_json, atomic_write_text, sha256_file

log = logging.getLogger("pitlm.train")
FILES = "files.json"


@contextlib.contextmanager
def _quiet_dcp():
    """DCP warns that it runs single-process when no process group exists; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*Detected an existing checkpoint.*")
        yield


def _state_dict_options(**kw):
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
                    trainer_state: dict[str, Any], config_yaml: str, env: DistEnv, keep_last: int,
                    keep: frozenset[int] = frozenset()) -> Path:
    """Write checkpoint `step`; then remove the oldest beyond `keep_last`, except the steps in `keep` (a
    sharded chronological run's member checkpoints, merged into members/ when the run ends)."""
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
        atomic_write_json(tmp / FILES, _file_records(tmp))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in md.list_checkpoints()[:-keep_last]:
            if md.checkpoint_step(old) not in keep:
                shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    env: DistEnv) -> dict[str, Any]:
    """Restore model (trainable part), optimizer and this rank's RNG; returns trainer_state."""
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


def _file_records(root: Path) -> dict[str, dict[str, Any]]:
    return {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != FILES}


def checkpoint_damage(path: Path, verify: str = "sha256") -> str | None:
    """Why the checkpoint at `path` cannot be trusted (naming the bad file), or None when it is intact.
    Checkpoints written before files.json existed get the structural checks only."""
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"{path / 'trainer_state.json'} is unreadable ({type(e).__name__})"
    if not (path / "dcp" / ".metadata").is_file():
        return f"{path / 'dcp' / '.metadata'} is missing"
    try:
        records = json.loads((path / FILES).read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        return f"{path / FILES} is unreadable ({type(e).__name__})"
    for rel, rec in records.items():
        f = path / rel
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != rec["bytes"]:
            return f"{f} has {f.stat().st_size} bytes, {rec['bytes']} were written (truncated?)"
        if verify == "sha256" and sha256_file(f) != rec["sha256"]:
            return f"{f} does not match the sha256 recorded when it was written (corrupt)"
    return None


def latest_checkpoint(md: ModelDir, env: DistEnv, verify: str | None = None) -> Path | None:
    """The newest checkpoint (with `verify`: the newest intact one, logging each damaged one skipped and why).
    Rank 0 decides (a listing may race with a rename on a shared filesystem) and tells the others."""
    found = None
    if env.is_main:
        for path in reversed(md.list_checkpoints()):
            damage = checkpoint_damage(path, verify) if verify else None
            if damage is None:
                found = path
                break
            log.warning("checkpoint %s is damaged: %s; trying the one before it", path.name, damage)
    return broadcast_object(found, env)
