"""Models, tokenizers and LoRA for training: arch presets, scratch/base model construction, the LoRA presets and
the guard that refuses a LoRA run which would freeze most of the model, and the optimizer's param groups."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from pitlm.archs import arch_keys
from pitlm.errors import ConfigError, PitlmError
from pitlm.kernels.experts import install_expert_lora
from pitlm.kernels.install import cpu_safe_delta_rules
from pitlm.kernels.lora_dense import install_dense_lora

log = logging.getLogger("pitlm.train")

# LoRA target lists. qwen3.5-moe is the seed's verified 12 entries (10 module kinds + the experts' two fused 3-D
# parameters): attention q/k/v/o, Gated DeltaNet in_proj_qkv/in_proj_z/out_proj, shared-expert gate/up/down.
LORA_PRESETS: dict[str, dict[str, list[str]]] = {
    "qwen3.5-moe": {
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj",
                           "gate_proj", "up_proj", "down_proj"],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    },
    "dense": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              "target_parameters": []},
    "attention": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "target_parameters": []},
}


def torch_dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


# ----------------------------------------------------------------------------- configs, tokenizers, models

def build_model_config(spec: dict[str, Any] | str, vocab_size: int | None = None, tokenizer: Any = None):
    """A transformers config from an arch preset name or a dict ({arch: PRESET, key: value, ...} or model_type+keys).
    The tokenizer's vocabulary size and special ids win over the preset's, explicit keys over both."""
    spec = {"arch": spec} if isinstance(spec, str) else dict(spec)
    arch = spec.pop("arch", None)
    keys = arch_keys(arch) if arch else {}
    if vocab_size:
        keys["vocab_size"] = vocab_size
    if tokenizer is not None:
        for k in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if getattr(tokenizer, k, None) is not None:
                keys[k] = getattr(tokenizer, k)
    if "num_hidden_layers" in spec and "layer_types" not in spec:
        keys.pop("layer_types", None)  # a preset's per-layer pattern is recomputed for the new depth
    keys.update(spec)
    model_type = keys.pop("model_type", None)
    if not model_type:
        raise ConfigError("model config needs `arch: PRESET` or `model_type: ...` (e.g. qwen3, llama)")
    try:
        return AutoConfig.for_model(model_type, **keys)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"cannot build a '{model_type}' config: {e}") from e


def build_scratch_model(config, dtype: torch.dtype, device: torch.device | str = "cpu",
                        attn_implementation: str | None = None) -> nn.Module:
    """Random weights from a config, built directly on `device` (use device='meta' to materialise later)."""
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    cpu_safe_delta_rules()
    return model


def load_pretrained_model(path: str, dtype: torch.dtype, device: torch.device | str = "cpu",
                          attn_implementation: str | None = None) -> nn.Module:
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if torch.device(device).type == "cuda":
        kwargs["device_map"] = str(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise PitlmError(f"cannot load model '{path}': {str(e).splitlines()[0]}") from e
    cpu_safe_delta_rules()
    return model.to(device)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The transformer blocks of an HF causal LM (peft-wrapped or not)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None) or getattr(getattr(inner, "decoder", None), "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


# ----------------------------------------------------------------------------- LoRA

def lora_targets(cfg) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) from lora.preset, overridden by explicit lists."""
    preset: dict[str, list[str]] = {"target_modules": [], "target_parameters": []}
    if cfg.preset:
        if cfg.preset not in LORA_PRESETS:
            raise ConfigError(f"unknown lora.preset '{cfg.preset}'; known: {', '.join(LORA_PRESETS)}")
        preset = LORA_PRESETS[cfg.preset]
    modules = cfg.target_modules if cfg.target_modules is not None else preset["target_modules"]
    params = cfg.target_parameters if cfg.target_parameters is not None else preset["target_parameters"]
    if not modules and not params:
        raise ConfigError("LoRA has no targets: set lora.preset or lora.target_modules")
    return list(modules), list(params)


def apply_lora(model: nn.Module, cfg) -> nn.Module:
    """Wrap `model` with peft LoRA per the `lora` config section; full_modules become peft modules_to_save."""
    modules, params = lora_targets(cfg)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing_full = [m for m in cfg.full_modules if m not in present]
    if missing_full:
        raise ConfigError(f"lora.full_modules {missing_full} are not modules of this model")
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=modules or None,
                      target_parameters=params or None, modules_to_save=list(cfg.full_modules) or None,
                      bias="none", task_type="CAUSAL_LM",
                      # a tied model (lm_head is embed_tokens) must stay tied when both are trained in full
                      ensure_weight_tying=bool(getattr(model.config, "tie_word_embeddings", False)))
    try:
        with warnings.catch_warnings():  # peft reads a property transformers deprecated; not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, lcfg, autocast_adapter_dtype=cfg.adapter_dtype == "fp32")
    except ValueError as e:
        raise ConfigError(f"LoRA targets {modules + params} do not fit this model: {str(e).splitlines()[0]}") from e
    if cfg.full_modules and not cfg.full_modules_base_copy:
        n = share_full_module_storage(peft_model)
        log.info("full modules: %s of frozen base copies released (they share the trained copies' storage)",
                 f"{n / 2**30:.2f} GiB")
    if params and cfg.experts_path == "grouped":
        n = install_expert_lora(peft_model)
        log.info("expert LoRA: grouped GEMMs on the routed tokens in %d experts modules", n)
    if modules and cfg.dense_path == "fused":
        n = install_dense_lora(peft_model)
        log.info("dense LoRA: scale on the rank side, up-projection added in the GEMM in %d layers", n)
    return peft_model


def share_full_module_storage(model: nn.Module) -> int:
    """Point the frozen original of every peft ModulesToSaveWrapper at its trained copy's tensors (same shape and
    dtype only), so the original's memory is released. Returns the bytes released."""
    released = 0
    for wrapper in model.modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        trained = {n: p for name in wrapper.modules_to_save for n, p in wrapper.modules_to_save[name].named_parameters()}
        for n, p in wrapper.original_module.named_parameters():
            q = trained.get(n)
            if q is None or q.shape != p.shape or q.dtype != p.dtype or q.device != p.device:
                continue
            if p.data_ptr() != q.data_ptr():
                released += p.numel() * p.element_size()
                p.data = q.data
    return released


@dataclass
class LoraReport:
    adapter_params: int
    total_params: int
    full_params: int
    layers_adapted: int
    layers_total: int
    uncovered_kinds: dict[str, int]  # layer kind -> count of decoder layers with no adapter

    @property
    def fraction(self) -> float:
        return self.adapter_params / max(1, self.total_params)


def _layer_kind(model_cfg: Any, i: int, layer: nn.Module) -> str:
    types = getattr(model_cfg, "layer_types", None)
    if types and i < len(types):
        return str(types[i])
    names = {n for n, _ in layer.named_children()}
    return "linear_attention" if "linear_attn" in names else "attention"


def lora_report(model: nn.Module) -> LoraReport:
    """How much of a peft model LoRA adapts: adapter parameters vs. the base model, and decoder layers without any
    adapter, by layer kind (a hybrid model has several)."""
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    full = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n)
    base_total = sum(p.numel() for n, p in model.named_parameters()
                     if "lora_" not in n and "modules_to_save" not in n)
    layers = decoder_layers(model) or nn.ModuleList()
    model_cfg = getattr(model, "config", None)
    uncovered: dict[str, int] = {}
    adapted = 0
    for i, layer in enumerate(layers):
        if any("lora_" in n for n, _ in layer.named_parameters()):
            adapted += 1
        else:
            kind = _layer_kind(model_cfg, i, layer)
            uncovered[kind] = uncovered.get(kind, 0) + 1
    return LoraReport(adapter, base_total, full, adapted, len(layers), uncovered)


def check_lora(model: nn.Module, cfg) -> LoraReport:
    """Refuse a LoRA run that would train almost nothing, naming the likely cause. The seed's attention-only list on
    Qwen3.5-35B-A3B adapts 0.0099% of the model and leaves 30 of 40 (DeltaNet) layers frozen: its loss diverged."""
    rep = lora_report(model)
    modules, params = lora_targets(cfg)
    kinds = sorted({_layer_kind(getattr(model, "config", None), i, layer)
                    for i, layer in enumerate(decoder_layers(model) or [])})
    cause = None
    if rep.uncovered_kinds and rep.layers_adapted:
        missed = ", ".join(f"{n} {k} layers" for k, n in rep.uncovered_kinds.items())
        cause = (f"the targets {modules + params} adapt only {rep.layers_adapted} of {rep.layers_total} decoder "
                 f"layers; {missed} get no adapter")
        if len(kinds) > 1 and all("linear" in k for k in rep.uncovered_kinds):
            cause += " (targets matched only attention in a hybrid model)"
    elif rep.layers_total and not rep.layers_adapted:
        cause = f"the targets {modules + params} match no module inside the decoder layers"
    low = rep.fraction < cfg.min_trainable_fraction
    if cfg.guard and (low or cause):
        why = (f"LoRA adapts {rep.adapter_params:,} parameters = {100 * rep.fraction:.4f}% of the model's "
               f"{rep.total_params:,}")
        if low:
            why += f" (< {100 * cfg.min_trainable_fraction:.4g}%)"
        hint = ("use lora.preset=qwen3.5-moe (attention + DeltaNet in_proj_qkv/in_proj_z/out_proj + shared and "
                "routed experts)" if len(kinds) > 1 else "add the MLP projections (lora.preset=dense)")
        raise ConfigError(f"{why}: {cause or 'the targets match too little of the model'}; {hint}, "
                          "or set lora.guard=false to train it anyway")
    return rep
