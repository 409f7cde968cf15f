"""Configs of the corpus stage (pydantic, validated with one-line errors)."""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import field_validator, model_validator

from pitlm.config import StageConfig
from pitlm.corpus.dates import parse_cutoff, parse_cutoffs, parse_dump
from pitlm.errors import ConfigError

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
# how a corpus is built, not what: kept out of the manifest's config and of the resume key
HOW_FIELDS = ("workers", "overwrite", "executor", "tasks", "ray_address", "slurm_partition", "slurm_time", "slurm_args")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def parse_token_count(value) -> int | None:
    """'100M' -> 100_000_000, '2.5k' -> 2500, '1B' -> 10**9, 'all'/None -> None (everything available)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("all", "")):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgGtT]?)\s*", str(value))
        if not m:
            raise ConfigError(f"bad token count '{value}': expected e.g. 100M, 1B, 2.5k, 50000 or 'all'")
        n = int(round(float(m.group(1)) * _SUFFIX[m.group(2).lower()]))
    if n <= 0:
        raise ConfigError(f"bad token count '{value}': must be positive")
    return n


def absolute_spec(spec: str, names: tuple[str, ...], prefixes: tuple[str, ...]) -> str:
    """A local path or glob made absolute (so the manifest's source can be re-read from anywhere); named sources
    and prefixed specs are kept as they are."""
    spec = str(spec).strip()
    if spec in names or spec.startswith(prefixes):
        return spec
    return os.path.abspath(os.path.expanduser(spec))


def check_name(name: str, what: str = "corpus") -> str:
    if not NAME_RE.match(name or ""):
        raise ConfigError(f"bad {what} name '{name}': use letters, digits, '.', '_' or '-', not starting with '.'/'_'")
    return name


class SourceFilterConfig(StageConfig):
    """What to read and which documents may be kept."""

    source: str
    cutoff: dt.date
    lang: str | None = "en"
    min_chars: int = 1
    min_language_score: float = 0.0
    dumps: list[str] | None = None
    seed: int = 0

    @field_validator("cutoff", mode="before")
    @classmethod
    def _cutoff(cls, v):
        return parse_cutoff(v)

    @field_validator("source")
    @classmethod
    def _source(cls, v):
        return absolute_spec(v, ("fineweb", "fineweb-edu"), ("hf:", "world:"))

    @field_validator("lang", mode="before")
    @classmethod
    def _lang(cls, v):
        return None if v is None or str(v).strip().lower() in ("", "any", "none", "all") else str(v).strip()

    @field_validator("dumps", mode="before")
    @classmethod
    def _dumps(cls, v):
        if v is None or v == "":
            return None
        names = [s.strip() for s in (v.split(",") if isinstance(v, str) else v) if str(s).strip()]
        for n in names:
            parse_dump(n)
        return names or None


class CorpusConfig(SourceFilterConfig):
    """`pitlm corpus build`. `workers`, `overwrite` and the executor fields change how, not what, is built: they are kept out of the
    manifest and of the resume key.

    Periods: a build keeps documents crawled in (after, cutoff] (after = -inf by default). With `cutoffs`
    c_1 < ... < c_n it is a nested corpus of the periods (after, c_1], (c_1, c_2], ..., (c_{n-1}, c_n], and `cutoff`
    is c_n; each period is sampled, budget-cut (`target_tokens` is per period) and packed as a build of that
    period alone would be."""

    name: str
    tokenizer: str
    cutoffs: list[dt.date] | None = None  # a nested corpus (two or more cutoffs); None = the one period up to cutoff
    after: dt.date | None = None  # keep only documents crawled after the end of this day (UTC)
    target_tokens: int | None = None  # train tokens; None = all available
    val_fraction: float = 0.005
    shard_tokens: int = 2**25  # 32 Mi tokens: 64 MiB per uint16 shard, the unit of resume and of parallel packing
    hub_oversample: float = 1.5  # hub dumps are read up to this times their share of the budget
    workers: int = max(1, min(8, os.cpu_count() or 1))
    overwrite: bool = False
    # what runs the parallel stages (pitlm.corpus.executors); none of these changes a byte of the corpus
    executor: Literal["mp", "local", "slurm", "ray"] = "mp"
    tasks: int | None = None  # datatrove tasks per stage (default: workers); local/ray run `workers` at once
    ray_address: str | None = None  # a Ray cluster (default: $RAY_ADDRESS, else a local ray.init())
    slurm_partition: str | None = None  # default: $SLURM_JOB_PARTITION (inside a job), else the cluster's default
    slurm_time: str = "24:00:00"  # per array task
    slurm_args: list[str] | None = None  # extra #SBATCH options, e.g. ["--account=abc", "--mem-per-cpu=4G"]

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return check_name(v)

    @field_validator("slurm_args", mode="before")
    @classmethod
    def _slurm_args(cls, v):
        if v in (None, "", []):
            return None
        return [s.strip() for s in (v.split(",") if isinstance(v, str) else v) if str(s).strip()]

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer(cls, v):
        # a local directory becomes absolute (the manifest records it; training and audits may run elsewhere)
        return str(Path(v).expanduser().resolve()) if Path(v).expanduser().exists() else v

    @model_validator(mode="before")
    @classmethod
    def _cutoffs(cls, data):
        if not isinstance(data, dict) or data.get("cutoffs") in (None, ""):
            return data
        data = dict(data)
        cutoffs = parse_cutoffs(data["cutoffs"])
        if data.get("cutoff") not in (None, "") and parse_cutoff(data["cutoff"]) != cutoffs[-1]:
            raise ConfigError("give --cutoff D (one period) or --cutoffs D1,D2,... (nested periods), not both")
        data["cutoff"] = cutoffs[-1]
        data["cutoffs"] = cutoffs if len(cutoffs) > 1 else None  # one cutoff is the plain one-period corpus
        return data

    @field_validator("after", mode="before")
    @classmethod
    def _after(cls, v):
        return None if v in (None, "") else parse_cutoff(v)

    @model_validator(mode="after")
    def _after_first_cutoff(self):
        first = self.cutoffs[0] if self.cutoffs else self.cutoff
        if self.after is not None and self.after >= first:
            raise ConfigError(f"--after {self.after} must be before the {'first ' if self.cutoffs else ''}cutoff "
                              f"{first}: the period (after, cutoff] would be empty")
        return self

    @field_validator("target_tokens", mode="before")
    @classmethod
    def _target(cls, v):
        return parse_token_count(v)

    @field_validator("val_fraction")
    @classmethod
    def _val(cls, v):
        if not 0.0 <= v < 0.5:
            raise ValueError("must be in [0, 0.5)")
        return v

    @field_validator("shard_tokens", "workers", "tasks")
    @classmethod
    def _positive(cls, v):
        if v is not None and v <= 0:
            raise ValueError("must be positive")
        return v

    @property
    def nested(self) -> bool:
        return self.cutoffs is not None

    def periods(self) -> list[tuple[dt.date | None, dt.date]]:
        """(start, cutoff) of each period, in order: documents crawled after the end of `start` (None: any time) up
        to the end of `cutoff`."""
        ends = self.cutoffs or [self.cutoff]
        return list(zip([self.after, *ends[:-1]], ends, strict=True))

    def content(self) -> dict:
        """What determines the built corpus (the manifest's config and the resume key). `cutoffs` and `after` are
        left out when unset, so a one-period build keeps the config (and resume key) it had before they existed."""
        unset = {k for k in ("cutoffs", "after") if getattr(self, k) is None}
        return self.model_dump(mode="json", exclude={*HOW_FIELDS, *unset})


class TokenizerConfig(SourceFilterConfig):
    """`pitlm corpus tokenizer`: a byte-level BPE trained on documents crawled on or before the cutoff."""

    name: str
    vocab_size: int = 1500
    min_frequency: int = 2
    max_docs: int | None = None
    overwrite: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return check_name(v, "tokenizer")

    @field_validator("vocab_size")
    @classmethod
    def _vocab(cls, v):
        if v < 260:
            raise ValueError("must be >= 260 (256 bytes + special tokens)")
        return v
