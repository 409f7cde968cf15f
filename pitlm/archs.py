"""Architectures and model directories, shared by training and evaluation (neither owns them).

Builtin architectures for `control:random-init:<arch>`, `pitlm bench embed --arch` and `pitlm bench train --arch`,
with a byte tokenizer for them (a random-weight model needs no trained vocabulary):

    tiny-qwen3         Qwen3, 2 layers, hidden 64 (CPU tests and demos)
    tiny-qwen3_5_moe   Qwen3.5 MoE hybrid: 3 Gated DeltaNet + 1 full-attention layer, 8 experts, hidden 64
    qwen3.5-35b-a3b    transformers' Qwen3_5MoeTextConfig() defaults = Qwen3.5-35B-A3B (DESIGN.md §3); GPU only

the training presets (demo-qwen3, pit-1b, pit-150m: `model: {arch: ...}` in a recipe), and `resolve_hf_dir`: an HF
id or a local path as a local directory.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, PreTrainedTokenizerFast, Qwen3_5MoeTextConfig, Qwen3Config

from pitlm.errors import ConfigError, PitlmError

_BYTE_VOCAB = 258  # <pad>, <eos>, 256 byte symbols


def _tiny_qwen3():
    return Qwen3Config(vocab_size=_BYTE_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                       pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=True)


def _tiny_qwen3_5_moe():
    return Qwen3_5MoeTextConfig(vocab_size=_BYTE_VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
                                linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                                num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                shared_expert_intermediate_size=32, max_position_embeddings=1024,
                                pad_token_id=0, eos_token_id=1, bos_token_id=1)


def _qwen35_35b_a3b():
    return Qwen3_5MoeTextConfig()


ARCHS = {"tiny-qwen3": _tiny_qwen3, "tiny-qwen3_5_moe": _tiny_qwen3_5_moe, "qwen3.5-35b-a3b": _qwen35_35b_a3b}


def arch_config(arch: str):
    """A transformers config: a builtin name, or the config of an HF id / checkpoint dir."""
    if arch in ARCHS:
        return ARCHS[arch]()
    return AutoConfig.from_pretrained(str(resolve_hf_dir(arch)))


def arch_config_dict(arch: str) -> dict[str, Any]:
    d = arch_config(arch).to_dict()
    d.pop("transformers_version", None)
    return d


@cache
def byte_tokenizer():
    """A byte-level tokenizer (ids 2..257 = bytes, 0 = <pad>, 1 = <eos>) as a transformers fast tokenizer."""
    vocab = {"<pad>": 0, "<eos>": 1}
    for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[ch] = i + 2
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


# Architectures by name: the training presets here, plus the builtin archs above (tiny-qwen3,
# tiny-qwen3_5_moe, qwen3.5-35b-a3b = transformers' Qwen3_5MoeTextConfig defaults), so `pitlm bench train --arch` and
# `pitlm bench embed --arch` take the same names. Any transformers config key overrides a preset
# (`model: {arch: demo-qwen3, hidden_size: 256}`).
ARCH_PRESETS: dict[str, dict[str, Any]] = {
    # The demo's model: ~1.2 M parameters with a 1.5k vocabulary (DESIGN.md §5 measured this size on a 2-core CPU).
    "demo-qwen3": dict(model_type="qwen3", vocab_size=1536, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                       tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # From-scratch PIT pretraining (recipes scratch-pit-1b / scratch-pit-150m): Qwen3-style dense decoders (GQA,
    # QK-norm, SwiGLU, RMSNorm) over a 65,536-token PIT-trained tokenizer: a tokenizer trained only on text up to the
    # cutoff carries no later vocabulary, and its ids fit the uint16 shards. pit-1b: 1,074 M parameters (939 M in
    # the blocks and the LM head, untied); pit-150m: 149 M (tied embeddings).
    "pit-1b": dict(model_type="qwen3", vocab_size=65536, hidden_size=2048, intermediate_size=6144,
                   num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                   max_position_embeddings=4096, tie_word_embeddings=False,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "pit-150m": dict(model_type="qwen3", vocab_size=65536, hidden_size=768, intermediate_size=2816,
                     num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=6, head_dim=64,
                     max_position_embeddings=4096, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}
ARCH_ALIASES = {"tiny-qwen3.5-moe": "tiny-qwen3_5_moe", "qwen3.5-35b": "qwen3.5-35b-a3b"}


def arch_names() -> list[str]:
    return [*ARCH_PRESETS, *ARCHS, *ARCH_ALIASES]


def arch_keys(arch: str) -> dict[str, Any]:
    """The config keys (with model_type) of an arch preset."""
    name = ARCH_ALIASES.get(arch, arch)
    if name in ARCH_PRESETS:
        return dict(ARCH_PRESETS[name])
    if name in ARCHS:
        keys = arch_config_dict(name)
        for k in ("_name_or_path", "architectures", "dtype"):
            keys.pop(k, None)
        return keys
    raise ConfigError(f"unknown arch '{arch}'; known: {', '.join(arch_names())}")


def resolve_hf_dir(name_or_path: str) -> Path:
    """A local dir for an HF id (downloaded or from the HF cache; offline with HF_HUB_OFFLINE=1) or a path."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p
    patterns = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
    try:
        d = Path(snapshot_download(name_or_path, allow_patterns=patterns + ["*.safetensors"]))
        if not any(d.glob("*.safetensors")):  # an older repo with PyTorch .bin weights only
            d = Path(snapshot_download(name_or_path, allow_patterns=patterns + ["*.bin"]))
        return d
    except Exception as e:  # noqa: BLE001 - hub errors are many; the user needs one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PitlmError(f"cannot fetch model '{name_or_path}' from the Hugging Face hub ({msg}); "
                         f"pass a local dir or check the id/network") from None
