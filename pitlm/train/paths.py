"""Where training reads and writes on the volume, and how config specs resolve to paths.

Specs used in configs:
    corpus     NAME -> PITLM_HOME/corpus/NAME/ (or an existing directory path); NAME@YYYY-MM-DD -> the slice of
               a nested corpus at that cutoff (pitlm.corpus.shards.open_corpus)
    tokenizer  pit:NAME -> PITLM_HOME/corpus/_tokenizers/NAME/ ; model:RUN -> PITLM_HOME/models/RUN/final/ ;
               an existing path ; otherwise an HF hub name
    base       model:RUN -> PITLM_HOME/models/RUN/final/ (merged/ for a LoRA run) ; a path ; an HF hub name ;
               model:RUN@YYYY-MM-DD -> the chronological run's family member of that cutoff

A model directory `PITLM_HOME/models/<run>/`:
    checkpoints/step_000500/   dcp/ (torch.distributed.checkpoint, one file per rank), rng_rank<r>.pt,
                               trainer_state.json, train_config.yaml      (last `checkpoint.keep_last` kept)
    final/                     HF model dir (scratch/full) or peft adapter dir (lora), tokenizer, train_config.yaml
    merged/                    lora only: the adapter folded into the base, an HF model dir + tokenizer
    tb/                        TensorBoard event files
    members/<YYYY-MM-DD>/      schedule=chronological: the member of each cutoff, laid out like a model dir
                               (final/, merged/ for lora) + member.json (cutoff, step, tokens seen, val loss)
    train_config.yaml          the resolved config
    manifest.json              what was trained, from what, the final metrics (written last: its presence = done)
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

from pitlm.corpus.shards import ShardIndex, open_corpus
from pitlm.corpus.tokenizer import resolve_tokenizer_path as resolve_corpus_tokenizer
from pitlm.errors import PitlmError
from pitlm.volume import Volume

CHECKPOINT_PREFIX = "step_"
MEMBER = "member.json"


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

    @property
    def members(self) -> Path:
        return self.root / "members"

    def member(self, cutoff: dt.date | str) -> ModelDir:
        """The family member of `cutoff` (a chronological run): final/ (+ merged/) and member.json."""
        return ModelDir(self.members / str(cutoff))

    def list_members(self) -> list[tuple[dt.date, ModelDir]]:
        """(cutoff, member dir) of every exported member (member.json written), in cutoff order."""
        if not self.members.is_dir():
            return []
        out = []
        for d in self.members.iterdir():
            if (d / MEMBER).is_file():
                try:
                    out.append((dt.date.fromisoformat(d.name), ModelDir(d)))
                except ValueError:
                    continue
        return sorted(out, key=lambda t: t[0])

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{step:06d}"

    @staticmethod
    def checkpoint_step(path: Path) -> int:
        return int(path.name[len(CHECKPOINT_PREFIX):])

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
    return ModelDir(vol.entry("models", run_name))  # a plain directory name, checked like every entry name


def open_train_corpus(spec: str, vol: Volume) -> ShardIndex:
    """The corpus (or slice, NAME@YYYY-MM-DD) a run reads: a name on the volume or a corpus directory."""
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "index.json").is_file():
        return ShardIndex.load(path)
    return open_corpus(spec, vol)


def split_member_spec(run: str) -> tuple[str, dt.date | None]:
    """'RUN' -> (RUN, None); 'RUN@YYYY-MM-DD' -> (RUN, that cutoff)."""
    name, at, tail = run.partition("@")
    if not at:
        return run, None
    try:
        return name, dt.date.fromisoformat(tail)
    except ValueError:
        raise PitlmError(f"bad member 'model:{run}': expected model:RUN@YYYY-MM-DD") from None


def member_dir(vol: Volume, run: str) -> ModelDir:
    """model:RUN -> models/RUN/; model:RUN@DATE -> its member dir (one-line error naming the cutoffs it has)."""
    name, cutoff = split_member_spec(run)
    md = model_dir(vol, name)
    if cutoff is None:
        return md
    member = md.member(cutoff)
    if not (member.root / MEMBER).is_file():
        have = ", ".join(str(c) for c, _ in md.list_members()) or "none"
        raise PitlmError(f"model:{run}: run {name} has no member for cutoff {cutoff} (members: {have}); train it "
                         f"with schedule=chronological on a corpus with that cutoff")
    return member


def resolve_model_path(spec: str, vol: Volume) -> str:
    """model:RUN -> the run's loadable HF dir (merged/ for a LoRA run, else final/); a path; or an HF hub id."""
    if spec.startswith("model:"):
        run = spec[len("model:"):]
        md = member_dir(vol, run)
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
