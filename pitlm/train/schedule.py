"""What each optimizer step reads and at which learning rate: the plain schedule, and the chronological one that
trains a whole family of point-in-time models in one run (DESIGN.md §7).

    schedule = build_schedule(cfg, index, world_size)       # index: the corpus (or a slice) of `corpus:`
    schedule.micro_batches(step, rank)                       # this rank's micro-batches of global step `step`
    schedule.lr_factor(step)                                 # the learning rate's factor at that step
    schedule.boundaries                                      # {end step of a segment: the segment}

plain          one segment over the whole corpus: window ids from one seeded permutation per epoch, linear warmup
               then cosine over `steps` (exactly what pitlm trained before schedules existed).
chronological  one segment per crawl period of a nested corpus (`pitlm corpus build --cutoffs ...`), in date
               order. Segment k (period k = documents crawled in (c_{k-1}, c_k]) runs `steps_per_period[k]` steps;
               each of its batches holds round(replay x batch_size) windows drawn from the earlier periods
               (segment 1: none) and the rest from period k, each part from its own seeded permutation; the
               learning rate restarts in every segment (warmup, then cosine to min_lr_ratio over the segment).
               Optimizer state carries across segments. At the end of segment k the model has read documents
               crawled on or before c_k only: it is exported as the family member `model:<run>@<c_k>`.

Everything is a pure function of (seed, step) and of the periods up to the step's own: the first k segments of
a family run are step for step the run on the slice `corpus@c_k` with the first k segment lengths (so a member
equals the run that ends at its cutoff), resume needs no data-loader state, and segment 1 with its own length is
the plain run on the corpus of c_1. The global batch does not depend on the world size (rank r takes its slice).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from pitlm.corpus.shards import ShardIndex
from pitlm.errors import PitlmError
from pitlm.train.data import PackedWindows, TrainOrder, val_batches
from pitlm.train.optim import lr_factor

if TYPE_CHECKING:
    from pitlm.train.config import TrainConfig


@dataclass
class Segment:
    """A stretch of steps [start, end) reading `new` (and `old` for replay) windows."""

    k: int  # 0-based segment number (period k + 1)
    start: int
    steps: int
    cutoff: dt.date | None  # the period's cutoff: the member's (None: the corpus records none)
    new: PackedWindows
    new_order: TrainOrder
    old: PackedWindows | None = None  # the earlier periods' windows (chronological with replay > 0)
    old_order: TrainOrder | None = None
    n_old: int = 0  # windows per global batch from `old`
    val_index: ShardIndex | None = None  # the held-out split this segment is validated on
    _val: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.start + self.steps

    def batch_windows(self, local_step: int, batch_size: int) -> list[np.ndarray]:
        """The global batch of the segment's `local_step`: its period's windows first, then the replayed ones."""
        n_new = batch_size - self.n_old
        out = [self.new.window(int(i)) for i in self.new_order.window_ids(local_step * n_new, n_new)]
        if self.n_old:
            assert self.old is not None and self.old_order is not None
            out += [self.old.window(int(i)) for i in self.old_order.window_ids(local_step * self.n_old, self.n_old)]
        return out


class Schedule:
    def __init__(self, segments: list[Segment], cfg: TrainConfig, world_size: int, kind: str):
        self.segments = segments
        self.kind = kind
        self.batch_size = cfg.batch_size
        self.seq_len = cfg.seq_len
        self.world_size = world_size
        self.grad_accum_steps = cfg.grad_accum_steps
        self.warmup_steps = cfg.optim.warmup_steps
        self.min_lr_ratio = cfg.optim.min_lr_ratio
        self.eval_batches = cfg.eval.batches

    @property
    def total_steps(self) -> int:
        return self.segments[-1].end

    @property
    def chronological(self) -> bool:
        return self.kind == "chronological"

    @property
    def boundaries(self) -> dict[int, Segment]:
        """{a segment's last step + 1: the segment}: where a chronological run exports a member."""
        return {s.end: s for s in self.segments} if self.chronological else {}

    def segment(self, step: int) -> Segment:
        for s in self.segments:
            if step < s.end:
                return s
        raise IndexError(f"step {step} is past the schedule's {self.total_steps} steps")

    def lr_factor(self, step: int) -> float:
        s = self.segment(step)
        return lr_factor(step - s.start, self.warmup_steps, s.steps, self.min_lr_ratio)

    def micro_batches(self, step: int, rank: int) -> list[torch.Tensor]:
        """This rank's micro-batches of global step `step`: the global batch is split into grad_accum_steps x
        world_size equal parts, micro-batch k of rank r being part k * world_size + r."""
        s = self.segment(step)
        windows = s.batch_windows(step - s.start, self.batch_size)
        micro = self.batch_size // (self.world_size * self.grad_accum_steps)
        out = []
        for k in range(self.grad_accum_steps):
            part = windows[(k * self.world_size + rank) * micro:(k * self.world_size + rank + 1) * micro]
            out.append(torch.from_numpy(np.stack([w.astype(np.int64) for w in part])))
        return out

    def val(self, step: int, rank: int) -> list[torch.Tensor]:
        """The fixed validation batches of the segment that holds `step` (a chronological segment: the held-out
        documents of its slice, periods 1..k)."""
        s = self.segment(min(step, self.total_steps - 1))
        if s._val is None:
            assert s.val_index is not None
            windows = PackedWindows.from_index(s.val_index, "val", self.seq_len)
            s._val = val_batches(windows, self.batch_size, self.eval_batches, rank, self.world_size)
        return s._val

    def describe(self) -> list[str]:
        if not self.chronological:
            return [f"plain schedule: {self.total_steps} steps over {self.segments[0].new.num_windows:,} windows"]
        return [f"segment {s.k + 1}: steps {s.start}..{s.end - 1}, period ending {s.cutoff}, "
                f"{s.new.num_windows:,} new windows, {s.n_old} of {self.batch_size} per batch replayed from "
                f"{s.old.num_windows if s.old is not None else 0:,} earlier windows" for s in self.segments]


def _period_windows(part: ShardIndex, seq_len: int, label: str) -> PackedWindows:
    return PackedWindows(part.arrays("train"), seq_len, name=label)


def segment_steps(cfg: TrainConfig, n_periods: int) -> list[int]:
    """Steps of each chronological segment: chronological.steps_per_period (an int, or one per period), else
    `steps` split evenly (it must divide)."""
    per = cfg.chronological.steps_per_period
    if per is None:
        if cfg.steps % n_periods:
            raise PitlmError(f"schedule=chronological over {n_periods} periods: steps={cfg.steps} does not split "
                             f"evenly; set chronological.steps_per_period (one number, or one per period)")
        return [cfg.steps // n_periods] * n_periods
    if isinstance(per, int):
        return [per] * n_periods
    if len(per) != n_periods:
        raise PitlmError(f"chronological.steps_per_period lists {len(per)} segments but the corpus has {n_periods} "
                         f"periods; give one number, or one per period")
    return list(per)


def build_schedule(cfg: TrainConfig, index: ShardIndex, world_size: int) -> Schedule:
    """The run's schedule over `index` (the corpus, or the slice `corpus@c` names)."""
    if cfg.schedule == "plain":
        windows = PackedWindows.from_index(index, "train", cfg.seq_len)
        seg = Segment(0, 0, cfg.steps, index.cutoff, windows, TrainOrder(windows.num_windows, cfg.seed),
                      val_index=index)
        return Schedule([seg], cfg, world_size, "plain")
    periods = index.periods()
    if not index.cutoffs or len(index.cutoffs) != len(periods):
        raise PitlmError(f"schedule=chronological needs a corpus that records its crawl periods; {index.root.name} "
                         "does not (build it with `pitlm corpus build NAME --cutoffs D1,D2,...`)")
    steps = segment_steps(cfg, len(periods))
    n_old = round(cfg.chronological.replay * cfg.batch_size)
    if cfg.chronological.replay > 0 and n_old in (0, cfg.batch_size):
        raise PitlmError(f"chronological.replay={cfg.chronological.replay} with batch_size={cfg.batch_size} "
                         f"replays {n_old} windows per batch; pick a share that leaves both parts non-empty")
    segments, start, seen = [], 0, []
    for k, (_, cutoff, part) in enumerate(periods):
        label = f"corpus {index.root.name} period {k + 1} (to {cutoff})"
        new = _period_windows(part, cfg.seq_len, label)
        seg = Segment(k, start, steps[k], cutoff, new,
                      TrainOrder(new.num_windows, cfg.seed, stream=(k, 0) if k else None),
                      val_index=index.slice(cutoff))
        if k and n_old:
            old = PackedWindows([a for p in seen for a in p.arrays("train")], cfg.seq_len,
                                name=f"corpus {index.root.name} periods 1..{k}")
            seg.old, seg.old_order, seg.n_old = old, TrainOrder(old.num_windows, cfg.seed, stream=(k, 1)), n_old
        segments.append(seg)
        seen.append(part)
        start += steps[k]
    return Schedule(segments, cfg, world_size, "chronological")
