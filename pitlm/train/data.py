"""Packed fixed-length training sequences from the token shards, in a deterministic order.

The split's shards are one long token stream (documents separated by EOS). Window i is tokens
[i*T, i*T + T + 1): T inputs and the T next-token targets, so consecutive windows share one token and no token is
wasted. The order of windows is a seeded permutation per epoch, and the batch of step s is a pure function of
(seed, s): resuming at step s needs no data-loader state, and the global batch does not depend on the world size
(rank r takes its slice of it).
"""

from __future__ import annotations

import numpy as np
import torch

from pitlm.corpus.shards import ShardIndex
from pitlm.errors import PitlmError


class PackedWindows:
    """Windows of `seq_len + 1` tokens over the concatenated shards of one split (memory-mapped, nothing copied)."""

    def __init__(self, arrays: list[np.ndarray], seq_len: int, name: str = "split"):
        self.arrays = [a for a in arrays if len(a)]
        self.seq_len = seq_len
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        self.num_tokens = int(self.offsets[-1])
        self.num_windows = max(0, (self.num_tokens - 1) // seq_len)
        if self.num_windows == 0:
            raise PitlmError(f"{name} has {self.num_tokens} tokens, fewer than one sequence of seq_len+1="
                             f"{seq_len + 1}; lower seq_len or build a larger corpus")

    @classmethod
    def from_index(cls, index: ShardIndex, split: str, seq_len: int) -> PackedWindows:
        return cls(index.arrays(split), seq_len, name=f"corpus {index.root.name} split '{split}'")

    def window(self, i: int) -> np.ndarray:
        start, stop = i * self.seq_len, i * self.seq_len + self.seq_len + 1
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts, k = [], first
        while start < stop:
            local = start - self.offsets[k]
            take = min(stop - start, len(self.arrays[k]) - local)
            parts.append(self.arrays[k][local:local + take])
            start += take
            k += 1
        return np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])

    def batch(self, window_ids: np.ndarray | list[int]) -> torch.Tensor:
        """(B, seq_len + 1) int64 tokens."""
        return torch.from_numpy(np.stack([self.window(int(i)).astype(np.int64) for i in window_ids]))


class TrainOrder:
    """Global sample g (= step * batch_size + j) -> window id, through a seeded permutation per epoch."""

    def __init__(self, num_windows: int, seed: int, stream: tuple[int, ...] | None = None):
        self.num_windows = num_windows
        self.seed = seed
        self.stream = tuple(stream or ())  # another independent order from the same seed (a chronological segment)
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, *self.stream, epoch]).permutation(self.num_windows)
        return self._perm

    def window_ids(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for j in range(count):
            g = start + j
            out[j] = self._permutation(g // self.num_windows)[g % self.num_windows]
        return out


def val_batches(windows: PackedWindows, batch_size: int, num_batches: int, rank: int,
                world_size: int) -> list[torch.Tensor]:
    """A fixed validation set: the first num_batches x batch_size windows of the held-out split (fewer when the split
    is small), this rank's share of each batch."""
    per_rank = max(1, batch_size // world_size)
    count = min(num_batches, windows.num_windows // (per_rank * world_size))
    if count == 0:  # a small split: one batch of what there is
        per_rank, count = windows.num_windows // world_size, 1
    if per_rank == 0:
        raise PitlmError(f"the validation split has {windows.num_windows} windows, fewer than the world size "
                         f"{world_size}; build a larger val split")
    return [windows.batch(np.arange(per_rank) + (b * world_size + rank) * per_rank) for b in range(count)]
