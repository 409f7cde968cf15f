"""Exports and `pitlm merge`: turn what training wrote into directories that `from_pretrained` loads.

- A DCP checkpoint (any mode) -> one HF checkpoint, in a single process with no process group: the model is built
  on the meta device, materialised on the CPU, filled from the shards by DCP (which reshards on load), and saved
  with save_pretrained. This is the seed's "merge as a separate single-GPU job" step, made a command.
- A LoRA checkpoint -> the peft adapter dir (final/) and the adapter folded into the base (merged/).
- A peft adapter dir -> merged/ beside it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import PeftConfig, PeftModel
from torch import nn
from transformers import AutoConfig

from pitlm.corpus.tokenizer import load_tokenizer
from pitlm.errors import PitlmError
from pitlm.train.checkpoint import load_model_weights
from pitlm.train.config import TrainConfig
from pitlm.train.model import apply_lora, load_pretrained_model, torch_dtype
from pitlm.train.parallel import build_meta_model, materialize
from pitlm.train.paths import ModelDir, resolve_model_path
from pitlm.volume import Volume, atomic_dir

log = logging.getLogger("pitlm.train")


def _write_extras(out: Path, tokenizer: Any, config_yaml: str | None) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if config_yaml is not None:
        (out / "train_config.yaml").write_text(config_yaml)


def export_hf_model(model: nn.Module, out: Path, tokenizer: Any = None, config_yaml: str | None = None) -> Path:
    """save_pretrained into `out`, atomically (a half-written final/ is never visible)."""
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        _write_extras(tmp, tokenizer, config_yaml)
    return out


def export_lora(peft_model: nn.Module, md: ModelDir, tokenizer: Any = None, config_yaml: str | None = None,
                merge: bool = True) -> list[Path]:
    """final/ = the peft adapter (with the fully trained lm_head/embed_tokens); merged/ = adapter folded into the base.
    Folding mutates the model: call this last."""
    with atomic_dir(md.final, overwrite=True) as tmp:
        peft_model.save_pretrained(tmp)
        _write_extras(tmp, tokenizer, config_yaml)
    written = [md.final]
    if merge:
        merged = peft_model.merge_and_unload()
        export_hf_model(merged, md.merged, tokenizer, config_yaml)
        written.append(md.merged)
    return written


# ----------------------------------------------------------------------------- pitlm merge

def _checkpoint_config(ckpt: Path) -> tuple[TrainConfig, dict[str, Any]]:
    cfg = TrainConfig.model_validate(yaml.safe_load((ckpt / "train_config.yaml").read_text()))
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return cfg, state


def load_checkpoint_model(ckpt: Path, dtype: torch.dtype | None = None) -> tuple[nn.Module, TrainConfig, dict]:
    """A single-process model holding a checkpoint's weights: the HF model (scratch/full) or the peft model (lora);
    with the checkpoint's config and trainer state."""
    cfg, state = _checkpoint_config(ckpt)
    dtype = dtype or torch_dtype(state.get("param_dtype", "fp32"))
    if cfg.mode == "lora":
        base = load_pretrained_model(state["base_path"], dtype, "cpu", cfg.attn_implementation)
        model = apply_lora(base, cfg.lora)
    else:
        config = AutoConfig.from_pretrained(ckpt)
        model = build_meta_model(config, dtype, cfg.attn_implementation)
        materialize(model, torch.device("cpu"))
    load_model_weights(ckpt, model)
    model.eval()
    return model, cfg, state


def merge_checkpoint(ckpt: Path, out_root: Path | None = None) -> list[Path]:
    """Checkpoint -> final/ (HF dir; peft adapter for lora) and, for lora, merged/. Default: beside checkpoints/."""
    if not (ckpt / "dcp").is_dir() or not (ckpt / "trainer_state.json").is_file():
        raise PitlmError(f"{ckpt} is not a pitlm checkpoint (no dcp/ and trainer_state.json)")
    model, cfg, state = load_checkpoint_model(ckpt)
    md = ModelDir(out_root or ckpt.parent.parent)
    tokenizer = load_tokenizer(state["tokenizer_path"], Volume.resolve()) if state.get("tokenizer_path") else None
    config_yaml = (ckpt / "train_config.yaml").read_text()
    log.info("merging %s (mode %s) into %s", ckpt, cfg.mode, md.root)
    if cfg.mode == "lora":
        return export_lora(model, md, tokenizer, config_yaml, merge=True)
    return [export_hf_model(model, md.final, tokenizer, config_yaml)]


def merge_adapter(adapter_dir: Path, out: Path | None = None, vol: Volume | None = None) -> Path:
    """A peft adapter dir -> the adapter folded into its base model, saved as an HF dir (default: ../merged)."""
    pcfg = PeftConfig.from_pretrained(str(adapter_dir))
    base_path = pcfg.base_model_name_or_path
    if vol is not None and base_path and base_path.startswith("model:"):
        base_path = resolve_model_path(base_path, vol)
    base = load_pretrained_model(base_path, torch.float32, "cpu")
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    out = out or adapter_dir.parent / "merged"
    tokenizer = load_tokenizer(str(adapter_dir), vol or Volume.resolve()) if (adapter_dir / "tokenizer_config.json").is_file() else None
    config_yaml = (adapter_dir / "train_config.yaml").read_text() if (adapter_dir / "train_config.yaml").is_file() \
        else None
    return export_hf_model(model.merge_and_unload(), out, tokenizer, config_yaml)


def merge_target(target: str, vol: Volume, out: Path | None = None) -> list[Path]:
    """RUN (models/RUN: its latest checkpoint), a checkpoint dir, a model dir, or a peft adapter dir."""
    path = Path(target).expanduser()
    if not path.exists():
        path = vol.path("models", target)
        if not path.exists():
            raise PitlmError(f"'{target}' is neither a path nor a run under {vol.path('models')}")
    if (path / "adapter_config.json").is_file():
        return [merge_adapter(path, out, vol)]
    if (path / "trainer_state.json").is_file():
        return merge_checkpoint(path, out)
    latest = ModelDir(path).latest_checkpoint()
    if latest is None:
        raise PitlmError(f"{path} has no checkpoints/step_* to merge (and is not a checkpoint or adapter dir)")
    return merge_checkpoint(latest, out)
