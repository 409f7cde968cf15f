"""Model specs (`--model NAME=SPEC`), their fingerprints, and loading a backbone for embedding.

SPEC forms:
    org/name or a local dir       a Hugging Face model (a merged checkpoint is just a dir)
    model:<run>                   PITLM_HOME/models/<run>/final (its merged/ when final/ is a LoRA adapter)
    model:<run>@YYYY-MM-DD        the family member of that cutoff of a chronological run (models/<run>/members/)
    adapter:PATH[@BASE_SPEC]      a peft adapter on a base (default: the adapter's base_model_name_or_path)
    control:random-features[:k=v,...]  knowledge-free: hashed char n-grams -> fixed Gaussian projection -> tanh
    control:random-init:<arch>    the architecture of <arch> (a builtin arch name, HF id or dir) with random weights
    embeddings:PATH               embeddings computed elsewhere, keyed by (SecuritiesCode, Date): a .parquet, or an
                                  .npy + PATH.keys.parquet|csv (layouts in pitlm/eval/embfile.py)

Fingerprints identify what an embedding was computed from, without loading weights: sha256 over the config,
tokenizer and weight files (full hashes up to 512 MiB, size + sampled chunks above), or over the spec, seed and
config for controls, over the file (and its keys file) for embeddings:PATH. The embedding cache is keyed by them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from pitlm.archs import ARCHS, arch_config, arch_config_dict, byte_tokenizer, resolve_hf_dir
from pitlm.errors import PitlmError
from pitlm.eval.embfile import check_path, keys_file
from pitlm.kernels.install import cpu_safe_delta_rules, install_fast_kernels
from pitlm.train.paths import member_dir
from pitlm.volume import Volume, sha256_file

SPEC_FORMS = ("an HF id (org/name)", "a local model dir", "model:<run>", "adapter:PATH[@BASE_SPEC]",
              "control:random-features[:dim=256,seed=0]", "control:random-init:<arch>",
              "embeddings:PATH (.parquet, or .npy + PATH.keys.parquet|csv)")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
RANDOM_FEATURES_DEFAULTS = {"dim": 256, "seed": 0, "ngram_min": 1, "ngram_max": 4, "n_hash": 2 ** 14, "scale": 1.0}


@dataclass(frozen=True)
class ModelSpec:
    """A parsed --model SPEC. `kind` is hf | adapter | random-features | random-init | embeddings."""

    raw: str
    kind: str
    path: str | None = None        # hf: model dir or HF id; adapter: adapter dir; embeddings: the file
    base: ModelSpec | None = None  # adapter: the base model
    arch: str | None = None        # random-init: builtin arch name, HF id or dir
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_control(self) -> bool:
        return self.kind in ("random-features", "random-init")

    @property
    def needs_lm(self) -> bool:
        return self.kind in ("hf", "adapter", "random-init")


def spec_error(spec: str, why: str = "unknown model spec") -> PitlmError:
    return PitlmError(f"{why} '{spec}'; use one of: {', '.join(SPEC_FORMS)}")


def _parse_options(text: str, spec: str) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        if "=" not in item:
            raise spec_error(spec, "bad option in model spec")
        k, v = item.split("=", 1)
        if k not in RANDOM_FEATURES_DEFAULTS:
            raise PitlmError(f"unknown option '{k}' in '{spec}'; known: {', '.join(RANDOM_FEATURES_DEFAULTS)}")
        try:
            opts[k] = float(v) if k == "scale" else int(v)
        except ValueError:
            raise PitlmError(f"option {k}={v!r} in '{spec}' must be a number") from None
    return opts


def _adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def parse_spec(spec: str, vol: Volume | None = None, seed: int = 0) -> ModelSpec:
    """Parse and resolve a SPEC (paths checked, run names found on the volume); weights are not loaded."""
    spec = spec.strip()
    if spec.startswith("control:random-features"):
        rest = spec[len("control:random-features"):]
        if rest and not rest.startswith(":"):
            raise spec_error(spec)
        opts = {**RANDOM_FEATURES_DEFAULTS, "seed": seed, **_parse_options(rest[1:], spec)}
        return ModelSpec(spec, "random-features", options=opts)
    if spec.startswith("control:random-init:"):
        arch = spec[len("control:random-init:"):]
        if not arch:
            raise spec_error(spec, "control:random-init needs an arch")
        if arch not in ARCHS and not Path(arch).expanduser().exists() and not _HF_ID.match(arch):
            raise PitlmError(f"unknown arch '{arch}' in '{spec}'; use a builtin ({', '.join(ARCHS)}), an HF id or a dir")
        return ModelSpec(spec, "random-init", arch=arch, options={"seed": seed})
    if spec.startswith("embeddings:"):
        path = Path(spec[len("embeddings:"):]).expanduser()
        check_path(path, spec)
        return ModelSpec(spec, "embeddings", path=str(path.resolve()))
    if spec.startswith("oracle:"):
        raise PitlmError(f"'{spec}' is the knowledge model of `pitlm calibrate` (it reads a synthetic world's "
                         f"planted ground truth); `pitlm eval` scores language models and controls")
    if spec.startswith("model:"):
        return _parse_run(spec, spec[len("model:"):], vol)
    if spec.startswith("adapter:"):
        return _parse_adapter(spec, spec[len("adapter:"):], vol)
    path = Path(spec).expanduser()
    if path.exists():
        if _adapter_dir(path):
            return _parse_adapter(spec, str(path), vol)
        if not (path / "config.json").is_file():
            raise PitlmError(f"model dir {path} has no config.json (not a Hugging Face checkpoint)")
        return ModelSpec(spec, "hf", path=str(path.resolve()))
    if ":" not in spec and _HF_ID.match(spec):
        return ModelSpec(spec, "hf", path=spec)
    raise spec_error(spec)


def _parse_run(spec: str, run: str, vol: Volume | None) -> ModelSpec:
    """model:RUN (its final/, merged/ for LoRA) or model:RUN@YYYY-MM-DD (a chronological run's member)."""
    vol = vol or Volume.resolve()
    md = member_dir(vol, run)
    final = md.final
    if not final.is_dir():
        raise PitlmError(f"'{spec}': no trained model at {final}; see PITLM_HOME/models/ for run names")
    if not _adapter_dir(final):
        return ModelSpec(spec, "hf", path=str(final))
    merged = md.merged
    if (merged / "config.json").is_file():
        return ModelSpec(spec, "hf", path=str(merged))
    return replace(_parse_adapter(spec, str(final), vol), raw=spec)


def _parse_adapter(spec: str, rest: str, vol: Volume | None) -> ModelSpec:
    adapter, _, base_spec = rest.partition("@")
    path = Path(adapter).expanduser()
    if not _adapter_dir(path):
        raise PitlmError(f"'{spec}': {path} is not a peft adapter dir (no adapter_config.json)")
    if not base_spec:
        base_spec = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
        if not base_spec:
            raise PitlmError(f"'{spec}': the adapter names no base model; give one as adapter:{adapter}@BASE_SPEC")
        if not Path(base_spec).expanduser().exists() and not _HF_ID.match(base_spec):
            raise PitlmError(f"'{spec}': the adapter's base '{base_spec}' cannot be found; "
                             f"give one as adapter:{adapter}@BASE_SPEC")
    base = parse_spec(base_spec, vol)
    if base.kind not in ("hf", "random-init"):
        raise PitlmError(f"'{spec}': the base of an adapter must be an HF model or a dir, got '{base_spec}'")
    return ModelSpec(spec, "adapter", path=str(path.resolve()), base=base)


def parse_named_specs(items: list[str], vol: Volume | None = None, seed: int = 0) -> dict[str, ModelSpec]:
    """['base=Qwen/Qwen3-0.6B', 'pit=model:lora1'] -> {name: ModelSpec}; names must be unique."""
    out: dict[str, ModelSpec] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        name = name.strip()
        if not sep or not name or not spec:
            raise PitlmError(f"--model expects NAME=SPEC, got '{item}'")
        if not re.fullmatch(r"[\w.-]+", name):
            raise PitlmError(f"model name '{name}' may use only letters, digits, '_', '.', '-'")
        if name in out:
            raise PitlmError(f"model name '{name}' given twice")
        out[name] = parse_spec(spec, vol, seed)
    return out


# ----------------------------------------------------------------------------- fingerprints

_FULL_HASH_LIMIT = 512 << 20
_SAMPLE_CHUNKS, _CHUNK = 16, 1 << 20
_MEMO: dict[tuple[str, int, int], str] = {}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                    "special_tokens_map.json")


def file_digest(path: Path) -> str:
    """sha256 of a file; above 512 MiB, of its size plus 16 evenly spaced 1 MiB chunks (a 70 GB checkpoint is
    fingerprinted in a second, and any re-save changes the safetensors header in the first chunk)."""
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo_key in _MEMO:
        return _MEMO[memo_key]
    if st.st_size <= _FULL_HASH_LIMIT:
        digest = sha256_file(path)
    else:
        h = hashlib.sha256(str(st.st_size).encode())
        with open(path, "rb") as f:
            for i in range(_SAMPLE_CHUNKS):
                f.seek((st.st_size - _CHUNK) * i // (_SAMPLE_CHUNKS - 1))
                h.update(f.read(_CHUNK))
        digest = "sampled:" + h.hexdigest()
    _MEMO[memo_key] = digest
    return digest


def fingerprint_dir(path: str | Path) -> str:
    """sha256 over a checkpoint dir's config, tokenizer and weight files (names, sizes, digests)."""
    path = Path(path)
    names = ["config.json", "adapter_config.json", *_TOKENIZER_FILES]
    files = sorted(p for p in path.iterdir() if p.is_file() and (p.name in names or p.suffix in _WEIGHT_SUFFIXES))
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in files):
        raise PitlmError(f"{path} holds no weight files ({', '.join(_WEIGHT_SUFFIXES)})")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{p.stat().st_size}\0{file_digest(p)}\n".encode())
    return h.hexdigest()


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(spec: ModelSpec) -> str:
    """What an embedding depends on, as a sha256 (no weights are loaded)."""
    if spec.kind == "random-features":
        return _sha({"kind": spec.kind, "version": 1, **spec.options})
    if spec.kind == "random-init":
        return _sha({"kind": spec.kind, "version": 1, "config": arch_config_dict(spec.arch), **spec.options})
    if spec.kind == "hf":
        return fingerprint_dir(resolve_hf_dir(spec.path))
    if spec.kind == "embeddings":
        path = Path(spec.path)
        keys = keys_file(path) if path.suffix == ".npy" else None
        return _sha({"kind": "embeddings", "file": file_digest(path), "keys": keys and file_digest(keys)})
    assert spec.kind == "adapter", spec.kind
    return _sha({"kind": "adapter", "base": fingerprint(spec.base), "adapter": fingerprint_dir(spec.path)})


def describe(spec: ModelSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"spec": spec.raw, "kind": spec.kind}
    for k in ("path", "arch"):
        if getattr(spec, k):
            out[k] = getattr(spec, k)
    if spec.base is not None:
        out["base"] = describe(spec.base)
    if spec.options:
        out["options"] = dict(spec.options)
    return out


# ----------------------------------------------------------------------------- loading

def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PitlmError(f"--device {device} asked for but no CUDA GPU is visible; use --device cpu")
    return device


def default_dtype(device: str):
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def backbone_of(model):
    """The decoder stack of a CausalLM (no lm_head): calling it returns last_hidden_state, never logits.
    transformers' get_decoder() returns `.model` for *ForCausalLM, the language model of a VL wrapper, and the
    model itself for a bare backbone."""
    return model.get_decoder()


def load_tokenizer(spec: ModelSpec):
    """The tokenizer saved with the model (an adapter's own, else its base's); builtin archs use bytes."""
    if spec.kind == "random-init" and spec.arch in ARCHS:
        return byte_tokenizer()
    d = resolve_hf_dir(spec.arch if spec.kind == "random-init" else spec.path)
    if any((d / f).is_file() for f in _TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(str(d))
    if spec.kind == "adapter":
        return load_tokenizer(spec.base)
    raise PitlmError(f"no tokenizer files in {d} for '{spec.raw}'; save the tokenizer beside the weights")


def load_causal_lm(spec: ModelSpec, device: str, dtype):
    """The full CausalLM (lm_head stays unused), in eval mode on `device`."""
    if spec.kind == "random-init":
        torch.manual_seed(int(spec.options.get("seed", 0)))
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(arch_config(spec.arch), dtype=dtype)
    elif spec.kind == "hf":
        kwargs: dict[str, Any] = {"dtype": dtype}
        if device.startswith("cuda"):
            kwargs["device_map"] = device  # load straight onto the GPU (a 35B model does not fit in host RAM twice)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(resolve_hf_dir(spec.path)), **kwargs)
        except (OSError, ValueError) as e:
            raise PitlmError(f"cannot load '{spec.raw}' as a causal LM ({str(e).splitlines()[0]})") from None
    elif spec.kind == "adapter":
        base = load_causal_lm(spec.base, device, dtype)
        # Merging folds the LoRA deltas into the weights: the same function, one matmul per layer fewer.
        model = PeftModel.from_pretrained(base, spec.path).merge_and_unload()
    else:
        raise PitlmError(f"'{spec.raw}' is not a language model")
    if getattr(model, "hf_device_map", None) is None:  # a model dispatched by device_map is already in place
        model = model.to(device)
    cpu_safe_delta_rules()
    if device.startswith("cuda"):
        install_fast_kernels(model, experts=True)
    return model.eval()
