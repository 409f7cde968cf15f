"""Where training reads and writes on the volume, and how config specs resolve to paths.

Specs used in configs:
    corpus     NAME -> PITLM_HOME/corpus/NAME/ (or an existing directory path)
    tokenizer  pit:NAME -> PITLM_HOME/corpus/_tokenizers/NAME/ ; model:RUN -> PITLM_HOME/models/RUN/final/ ;
               an existing path ; otherwise an HF hub name
    base       model:RUN -> PITLM_HOME/models/RUN/final/ (merged/ for a LoRA run) ; a path ; an HF hub name

A model directory `PITLM_HOME/models/<run>/`:
    checkpoints/step_000500/   dcp/ (torch.distributed.checkpoint, one file per rank), rng_rank<r>.pt,
                               trainer_state.json, train_config.yaml      (last `checkpoint.keep_last` kept)
    final/                     HF model dir (scratch/full) or peft adapter dir (lora), tokenizer, train_config.yaml
    merged/                    lora only: the adapter folded into the base, an HF model dir + tokenizer
    tb/                        TensorBoard event files
    train_config.yaml          the resolved config
    manifest.json              what was trained, from what, the final metrics (written last: its presence = done)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pitlm.errors import PitlmError
from pitlm.volume import Volume

CHECKPOINT_PREFIX = "step_"


@dataclass(frozen=True)
class ModelDir:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def config(self) -> Path:
        return self.root / "train_config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{step:06d}"

    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (a checkpoint is renamed into place only once complete)."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
        return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))

    def latest_checkpoint(self) -> Path | None:
        found = self.list_checkpoints()
        return found[-1] if found else None


def model_dir(vol: Volume, run_name: str) -> ModelDir:
    if not run_name or "/" in run_name or run_name.startswith("."):
        raise PitlmError(f"bad run name '{run_name}': use letters, digits, '-', '_' (it names models/<run>/)")
    return ModelDir(vol.entry("models", run_name))


def resolve_corpus_dir(spec: str, vol: Volume) -> Path:
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "index.json").is_file():
        return path
    corpus = vol.path("corpus", spec)
    if not (corpus / "index.json").is_file():
        raise PitlmError(f"corpus '{spec}' not found at {corpus} (no index.json); build it with "
                         f"`pitlm corpus build {spec} ...` or set corpus=PATH")
    return corpus


def resolve_model_path(spec: str, vol: Volume) -> str:
    """model:RUN -> the run's loadable HF dir (merged/ for a LoRA run, else final/); a path; or an HF hub id."""
    if spec.startswith("model:"):
        run = spec[len("model:"):]
        md = model_dir(vol, run)
        for candidate in (md.merged, md.final):
            if (candidate / "config.json").is_file():
                return str(candidate)
        raise PitlmError(f"{spec}: no trained model at {md.final} (train it first: `pitlm train --recipe {run}`, "
                         f"or `pitlm merge {run}` if only checkpoints exist)")
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise PitlmError(f"{path} is not an HF model directory (no config.json)")
        return str(path)
    return spec  # an HF hub id; from_pretrained says clearly when it cannot be fetched


def resolve_tokenizer_path(spec: str, vol: Volume) -> str:
    """model:RUN -> the run's model dir (its tokenizer is saved there); anything else as the corpus stage resolves it
    (pit:NAME -> corpus/_tokenizers/NAME, a path, an HF hub name)."""
    from pitlm.corpus.tokenizer import resolve_tokenizer_path as resolve_corpus_tokenizer

    if spec.startswith("model:"):
        return resolve_model_path(spec, vol)
    return resolve_corpus_tokenizer(spec, vol)


def corpus_tokenizer_spec(corpus_dir: Path) -> str | None:
    """The tokenizer a corpus was built with, when it records one: a tokenizer/ dir inside it, or its manifest."""
    if (corpus_dir / "tokenizer").is_dir():
        return str(corpus_dir / "tokenizer")
    manifest = corpus_dir / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        tok = json.loads(manifest.read_text()).get("tokenizer")
    except json.JSONDecodeError:
        return None
    if isinstance(tok, dict):
        tok = tok.get("spec") or tok.get("path") or tok.get("name")
    return tok if isinstance(tok, str) and tok else None
