"""Tokenizers for corpora: resolve any HF tokenizer, fingerprint its vocabulary, train a point-in-time BPE.

    load_tokenizer("gpt2", vol)              AutoTokenizer name on the hub (or in the local HF cache)
    load_tokenizer("/path/to/tokenizer", vol) a directory AutoTokenizer can load
    load_tokenizer("pit:demo-1500", vol)     a PIT tokenizer made by `pitlm corpus tokenizer demo-1500`,
                                              stored at PITLM_HOME/corpus/_tokenizers/demo-1500/

Why a PIT tokenizer: a tokenizer trained on later text is itself a leak for a from-scratch PIT model (its merges
and vocabulary encode words that did not exist before the cutoff). `pitlm audit tokenizer` lists such entries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pitlm.corpus.dates import format_utc, parse_doc_date
from pitlm.corpus.scan import DocFilter, iter_eligible
from pitlm.corpus.sources import resolve_source
from pitlm.errors import PitlmError
from pitlm.volume import Volume, atomic_dir, build_manifest, check_entry_name, write_manifest

log = logging.getLogger("pitlm.corpus")

TOKENIZERS_DIR = "_tokenizers"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def pit_tokenizer_dir(vol: Volume, name: str) -> Path:
    return vol.path("corpus", TOKENIZERS_DIR, check_entry_name("tokenizer", name))


def resolve_tokenizer_path(spec: str, vol: Volume) -> str:
    """`pit:NAME` -> its directory on the volume; a local path as is; anything else is a hub name."""
    if spec.startswith("pit:"):
        path = pit_tokenizer_dir(vol, spec[4:])
        if not (path / "tokenizer.json").is_file():
            raise PitlmError(f"no PIT tokenizer '{spec[4:]}' at {path}; train it with `pitlm corpus tokenizer {spec[4:]} ...`")
        return str(path)
    return spec


def load_tokenizer(spec: str, vol: Volume):
    """A transformers tokenizer for `spec` (see module doc), with a one-line error when it cannot be loaded."""
    path = resolve_tokenizer_path(spec, vol)
    looks_local = path.startswith((".", "/", "~")) or Path(path).expanduser().exists()
    if looks_local and not Path(path).expanduser().exists():
        raise PitlmError(f"tokenizer path {path} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(str(Path(path).expanduser()) if looks_local else path)
    except Exception as e:  # noqa: BLE001 - hub / file errors become one line
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise PitlmError(f"cannot load tokenizer '{spec}': {detail}") from None
    if tok.eos_token_id is None:
        raise PitlmError(f"tokenizer '{spec}' has no EOS token; documents must be separated by one")
    if getattr(tok, "backend_tokenizer", None) is None:
        raise PitlmError(f"tokenizer '{spec}' is not a fast (Rust) tokenizer; corpus builds need one")
    return tok


def vocab_sha256(tok) -> str:
    """sha256 of the vocabulary (token -> id, sorted by id), including added tokens."""
    items = sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()


def tokenizer_info(tok, spec: str) -> dict:
    return {"spec": spec, "name_or_path": str(getattr(tok, "name_or_path", spec)), "class": type(tok).__name__,
            "vocab_size": len(tok), "eos_id": int(tok.eos_token_id), "eos_token": tok.eos_token,
            "vocab_sha256": vocab_sha256(tok)}


def backend_json(tok) -> str:
    """The Rust tokenizer serialized, so worker processes can rebuild it with `tokenizers` alone (fast import)."""
    return tok.backend_tokenizer.to_str()


def train_bpe(texts, vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE (`tokenizers`) trained on `texts`, wrapped as a transformers fast tokenizer with
    EOS (= BOS) `<|endoftext|>` and PAD `<|pad|>`."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN)


def train_pit_tokenizer(cfg, vol: Volume) -> dict:
    """`pitlm corpus tokenizer`: train a byte-level BPE on documents crawled on or before `cfg.cutoff` and save it
    (transformers-loadable, with a manifest) at PITLM_HOME/corpus/_tokenizers/NAME/. Returns the manifest."""
    t0 = time.time()
    final = pit_tokenizer_dir(vol, cfg.name)
    if final.exists() and not cfg.overwrite:
        raise PitlmError(f"tokenizer '{cfg.name}' already exists at {final}; pass --overwrite to retrain it")
    source = resolve_source(cfg.source, vol, cfg.cutoff, cfg.dumps)
    stats = {"docs": 0, "chars": 0, "max_doc_date": None, "min_doc_date": None}

    def texts():
        for rec in iter_eligible(source.units, DocFilter.from_config(cfg), cfg.max_docs):
            date = format_utc(parse_doc_date(rec["date"]))
            stats["docs"] += 1
            stats["chars"] += len(rec["text"])
            stats["max_doc_date"] = max(stats["max_doc_date"] or date, date)
            stats["min_doc_date"] = min(stats["min_doc_date"] or date, date)
            yield rec["text"]

    tok = train_bpe(texts(), cfg.vocab_size, cfg.min_frequency)
    if stats["docs"] == 0:
        raise PitlmError(f"nothing left after filtering: no document of '{cfg.source}' is crawled on or before "
                         f"{cfg.cutoff} and passes the filters")
    with atomic_dir(final, overwrite=cfg.overwrite) as tmp:
        tok.save_pretrained(str(tmp))
        manifest = build_manifest("tokenizer", inputs={"source": source.describe()},
                                  config=cfg.model_dump(mode="json", exclude={"overwrite"}),
                                  wall_seconds=round(time.time() - t0, 3), name=cfg.name, cutoff=str(cfg.cutoff),
                                  vocab_size=len(tok), vocab_sha256=vocab_sha256(tok), eos_id=int(tok.eos_token_id),
                                  **stats)
        write_manifest(tmp, manifest)
    return manifest
