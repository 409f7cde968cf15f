"""Embeddings of prompts: the last layer's hidden state at the last non-pad token, or a knowledge-free control.

LM path: the prompts are tokenized once, sorted by length (longest first, so an out-of-memory shows in the first
batch) and batched; each batch is padded (right by default; left works too), position ids are taken from the
attention mask so padding never shifts positions, and only the backbone runs (`model.get_decoder()`): the lm_head
(a 248k x 2048 matmul per token on Qwen3.5) is never computed. Rows come back in prompt order. bf16 on GPU, fp32 on
CPU, under `torch.inference_mode`.

Control path (`control:random-features`): hashed character 1-4-grams of the prompt (scikit-learn's
HashingVectorizer, l2-normalised) -> a fixed seeded Gaussian projection -> tanh. It sees exactly the prompt text
(date, code, numbers) and knows nothing else: whatever "leakage" it shows is an artifact of the protocol.

File path (`embeddings:PATH`, pitlm/eval/embfile.py): embeddings computed elsewhere are read and put in the rows'
order by their (SecuritiesCode, Date) keys, which `embed` then needs instead of prompts; they are not cached again.

`embed_prompts` caches every result on the volume (pitlm/eval/cache.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.feature_extraction.text import HashingVectorizer
from transformers import AutoModel

from pitlm.archs import arch_config
from pitlm.eval.cache import EmbeddingCache, cache_key
from pitlm.eval.embfile import load_for_rows
from pitlm.eval.models import (
    ModelSpec,
    backbone_of,
    default_dtype,
    describe,
    fingerprint,
    load_causal_lm,
    load_tokenizer,
    parse_spec,
    resolve_device,
)
from pitlm.eval.prompts import prompts_hash
from pitlm.kernels.install import cpu_safe_delta_rules, install_fast_kernels
from pitlm.kernels.profiling import profile_call
from pitlm.log import make_progress
from pitlm.volume import Volume

log = logging.getLogger("pitlm.eval")
EMBED_RECIPE_VERSION = 1


# ----------------------------------------------------------------------------- the knowledge-free control

def random_features(prompts: list[str], dim: int = 256, seed: int = 0, ngram_min: int = 1, ngram_max: int = 4,
                    n_hash: int = 2 ** 14, scale: float = 1.0) -> np.ndarray:
    """A fixed random-feature map of the prompt text: tanh(scale * hashed_char_ngrams(prompt) @ G), G ~ N(0, 1)
    of shape (n_hash, dim) drawn from `seed`. Deterministic; depends on the prompt text only."""
    hv = HashingVectorizer(analyzer="char", ngram_range=(ngram_min, ngram_max), n_features=n_hash,
                           alternate_sign=False, norm="l2")
    S = hv.transform(prompts)
    G = np.random.default_rng(seed).standard_normal((n_hash, dim), dtype=np.float32)
    return np.tanh(scale * np.asarray(S.astype(np.float32) @ G)).astype(np.float32)


# ----------------------------------------------------------------------------- the LM path

def last_token_states(backbone, input_ids, attention_mask):
    """Last-layer hidden state at each row's last non-pad token (either padding side)."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    length = attention_mask.shape[1]
    last = length - 1 - attention_mask.long().flip(-1).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right"):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def embed_token_ids(backbone, seqs: list[list[int]], batch_size: int, device: str, pad_id: int = 0,
                    padding_side: str = "right", description: str = "embed") -> np.ndarray:
    """Embed pre-tokenized sequences in length-sorted batches; rows returned in input order (float32)."""
    if any(len(s) == 0 for s in seqs):
        raise ValueError("cannot embed an empty token sequence")
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out: np.ndarray | None = None
    with torch.inference_mode(), make_progress() as bar:
        task = bar.add_task(description, total=len(seqs), rate="")
        t0 = time.perf_counter()
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = pad_batch([seqs[i] for i in idx], pad_id, padding_side)
            states = last_token_states(backbone, ids.to(device), mask.to(device)).float().cpu().numpy()
            if out is None:
                out = np.empty((len(seqs), states.shape[1]), dtype=np.float32)
            out[idx] = states
            done = start + len(idx)
            bar.update(task, advance=len(idx), rate=f"{done / max(time.perf_counter() - t0, 1e-9):.1f} prompts/s")
    assert out is not None
    return out


def tokenize(tokenizer, prompts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(prompts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]


def pad_id_of(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


# ----------------------------------------------------------------------------- cached entry point

@dataclass
class EmbedOptions:
    batch_size: int = 32
    device: str = "auto"
    max_length: int = 256
    padding_side: str = "right"
    reembed: bool = False   # ignore (and overwrite) a cached entry


@dataclass
class Embedding:
    X: np.ndarray
    key: str
    fingerprint: str
    cached: bool
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


def embed_recipe(spec: ModelSpec, opts: EmbedOptions) -> dict[str, Any]:
    """What, besides the model and prompts, the embedding depends on (part of the cache key)."""
    if spec.kind == "random-features":
        return {"v": EMBED_RECIPE_VERSION, "map": "hashed-char-ngrams-gaussian-tanh"}
    return {"v": EMBED_RECIPE_VERSION, "layer": "last", "pooling": "last_non_pad", "max_length": opts.max_length}


def compute_embedding(spec: ModelSpec, prompts: list[str], opts: EmbedOptions) -> tuple[np.ndarray, dict[str, Any]]:
    """Embed without the cache; returns (X, info with dtype/device/prompts_per_s)."""
    if spec.kind == "random-features":
        o = spec.options
        X = random_features(prompts, o["dim"], o["seed"], o["ngram_min"], o["ngram_max"], o["n_hash"], o["scale"])
        return X, {"device": "cpu", "dtype": "float32"}
    if not spec.needs_lm:
        raise ValueError(f"{spec.raw} cannot embed prompts by itself")
    device = resolve_device(opts.device)
    dtype = default_dtype(device)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(spec)
    model = load_causal_lm(spec, device, dtype)
    load_s = time.perf_counter() - t0
    seqs = tokenize(tokenizer, prompts, opts.max_length)
    t1 = time.perf_counter()
    X = embed_token_ids(backbone_of(model), seqs, opts.batch_size, device, pad_id_of(tokenizer), opts.padding_side,
                        description=f"embed {spec.raw}")
    dt = time.perf_counter() - t1
    del model
    return X, {"device": device, "dtype": str(dtype).replace("torch.", ""), "load_seconds": round(load_s, 3),
               "prompts_per_s": round(len(prompts) / max(dt, 1e-9), 2),
               "mean_tokens": round(float(np.mean([len(s) for s in seqs])), 2)}


def embed(spec: ModelSpec | str, prompts: list[str], vol: Volume, opts: EmbedOptions | None = None,
          keys=None) -> Embedding:
    """Embed `prompts` with `spec`, reading/writing the volume's cache; an `embeddings:PATH` spec reads its file
    for `keys` (a DataFrame of the rows' SecuritiesCode, Date, in prompt order) instead."""
    opts = opts or EmbedOptions()
    spec = parse_spec(spec, vol) if isinstance(spec, str) else spec
    fp = fingerprint(spec)
    if spec.kind == "embeddings":
        return _embedding_file(spec, fp, keys)
    p_sha = prompts_hash(prompts)
    key = cache_key(fp, p_sha, embed_recipe(spec, opts))
    cache = EmbeddingCache(vol)
    t0 = time.perf_counter()
    if not opts.reembed and (X := cache.load(key, len(prompts))) is not None:
        log.info("embeddings of %s: cache hit %s", spec.raw, cache.path(key))
        return Embedding(X, key, fp, True, time.perf_counter() - t0, cache.meta(key))
    X, info = compute_embedding(spec, prompts, opts)
    if not np.isfinite(X).all():
        raise ValueError(f"embeddings of {spec.raw} contain non-finite values")
    seconds = time.perf_counter() - t0
    info = {**info, "model": describe(spec), "fingerprint": fp, "prompts_sha256": p_sha, "n_prompts": len(prompts),
            "recipe": embed_recipe(spec, opts), "seconds": round(seconds, 3), "batch_size": opts.batch_size}
    path = cache.save(key, X, info)
    log.info("embeddings of %s: %d x %d in %.1fs -> %s", spec.raw, *X.shape, seconds, path)
    return Embedding(X, key, fp, False, seconds, info)


def _embedding_file(spec: ModelSpec, fp: str, keys) -> Embedding:
    if keys is None:
        raise ValueError(f"{spec.raw} needs the rows' (SecuritiesCode, Date) keys, not prompts")
    t0 = time.perf_counter()
    X = load_for_rows(spec.path, keys)
    seconds = time.perf_counter() - t0
    log.info("embeddings of %s: %d x %d read from %s in %.1fs", spec.raw, *X.shape, spec.path, seconds)
    return Embedding(X, f"file-{fp[:16]}", fp, False, seconds,
                     {"device": "file", "dtype": "float32", "model": describe(spec), "fingerprint": fp})


def embed_prompts(model_spec: ModelSpec | str, prompts: list[str], vol: Volume, batch_size: int = 32,
                  device: str = "auto") -> np.ndarray:
    """Embeddings (n_prompts x dim, float32) of `prompts` under `model_spec`, cached on the volume."""
    return embed(model_spec, prompts, vol, EmbedOptions(batch_size=batch_size, device=device)).X


# ----------------------------------------------------------------------------- throughput (pitlm bench embed)

def bench_embed(arch: str, n_prompts: int = 256, batch_sizes: tuple[int, ...] = (32,), device: str = "auto",
                prompt_tokens: int = 64, seed: int = 0, fast_kernels: bool = True,
                profile_path: str | None = None, routed_kernels: bool = True) -> dict[str, Any]:
    """Forward-only embedding throughput of a random-weight `arch` (builtin name, HF id or dir) on prompts of
    `prompt_tokens` random tokens: the same batching and last-token path as `pitlm eval`. Only the backbone is built
    (no lm_head), once, directly on the target device in its eval dtype; each batch size is then timed after a
    warm-up batch; on a GPU with pitlm's fused kernels unless `fast_kernels` is off (`routed_kernels` off: all but
    the routed experts' Triton kernels, pitlm.kernels.routed); `profile_path`: a
    torch.profiler table of one more batch of the first size. Keys: the first batch size's figures, plus
    `prompts_per_s_batch<B>` for every B."""
    device = resolve_device(device)
    dtype = default_dtype(device)
    cuda = device.startswith("cuda")
    config = arch_config(arch)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModel.from_config(config, dtype=dtype).eval()
    cpu_safe_delta_rules()
    kernels = install_fast_kernels(model, experts=True, routed=routed_kernels) if fast_kernels and cuda else []
    out: dict[str, Any] = {"arch": arch, "device": device, "dtype": str(dtype).replace("torch.", ""),
                           "params": sum(p.numel() for p in model.parameters()),
                           "build_seconds": round(time.perf_counter() - t0, 3), "n_prompts": n_prompts,
                           "prompt_tokens": prompt_tokens, "fast_kernels": ", ".join(kernels) or "none"}
    if cuda:
        out["gpu"] = torch.cuda.get_device_name()
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(2, int(config.vocab_size), size=prompt_tokens).tolist() for _ in range(n_prompts)]
    for b in batch_sizes:
        embed_token_ids(model, seqs[:b], b, device, description="warm-up")  # kernels, allocator
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t1 = time.perf_counter()
        X = embed_token_ids(model, seqs, b, device, description=f"bench {arch} batch {b}")
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t1
        row = {"batch_size": b, "embed_seconds": round(dt, 3), "prompts_per_s": round(n_prompts / dt, 2),
               "tokens_per_s": round(n_prompts * prompt_tokens / dt, 1), "hidden_size": int(X.shape[1]),
               "finite": bool(np.isfinite(X).all())}
        if cuda:
            row["peak_vram_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
        out[f"prompts_per_s_batch{b}"] = row["prompts_per_s"]
        if profile_path and b == batch_sizes[0]:  # one more forward of the first batch size, profiled
            profile_call(lambda b=b: embed_token_ids(model, seqs[:b], b, device, description="profile"),
                         profile_path, cuda)
        if b == batch_sizes[0]:
            out.update(row)
    return out
