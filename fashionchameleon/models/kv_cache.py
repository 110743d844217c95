"""Slot-addressed KV cache for the block-causal student.

The cache is one preallocated buffer per layer, cut into four regions (slots) by frame:

    [ REFERENCE | GARMENT | SINK (first chunk) | HISTORY (FIFO ring) ]

Keys are stored after RoPE (as in the authors' code), so the order of keys inside the buffer does not
matter to attention and HISTORY can be a ring: eviction is bookkeeping, never a copy. All bookkeeping is
Python ints, so a forward never reads a tensor back to the host.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch


class KVSlot(str, enum.Enum):
    """Named regions of the cache; the order here is the order of regions in the buffer."""

    REFERENCE = "reference"
    GARMENT = "garment"
    SINK = "sink"
    HISTORY = "history"


ALL_SLOTS: tuple[KVSlot, ...] = tuple(KVSlot)


@dataclass(frozen=True)
class WindowPolicy:
    """How many latent frames each slot holds (the paper's M = 23 = 1 + 1 + 3 + 18).

    A chunk being generated sees at most `window` frames including itself: before a chunk, HISTORY is
    trimmed FIFO to `history_frames - chunk_frames` (see `KVCache.make_room`), so the chunk's own frames
    and everything cached add up to the window, as in the authors' streaming pipeline.
    """

    sink_frames: int = 3
    history_frames: int = 18

    def capacity(self, slot: KVSlot) -> int:
        return {KVSlot.REFERENCE: 1, KVSlot.GARMENT: 1, KVSlot.SINK: self.sink_frames}.get(slot, self.history_frames)

    @property
    def window(self) -> int:
        return sum(self.capacity(slot) for slot in KVSlot)


@dataclass(frozen=True)
class KVPlan:
    """What one forward reads and writes, in token ranges of the buffers (fixed before the forward runs).

    `write_runs` place this call's K/V in the buffer: stored (a commit or prefill) or, for a read-only pass,
    scratch in free frames that nothing reads later. When the visible frames and those runs form one contiguous
    range (`view`: always, for a stream whose sink is one chunk), attention reads that one buffer view; key order
    does not matter to attention, keys being stored after RoPE. Otherwise, and whenever this call's K/V carry
    gradient, the cached ranges and the call's own K/V are concatenated.
    """

    cache: "KVCache"
    read_ranges: tuple[tuple[int, int], ...]
    write_runs: tuple[tuple[int, int, int], ...]  # (buffer start, input start, length), in tokens
    stores: bool  # the write runs are kept (a commit or a prefill), not scratch
    view: tuple[int, int] | None  # [start, end) in tokens of visible frames + this call's own, when contiguous
    _saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, compare=False, repr=False)

    def extend(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Place this call's `key`/`value` [B, L, H, D] and return the keys/values attention runs over."""
        key_buffer, value_buffer = self.cache.keys[layer], self.cache.values[layer]
        fast = self.view is not None and not (key.requires_grad or value.requires_grad)
        if fast or self.stores:
            for dst, src, n in self.write_runs:
                key_buffer[:, dst : dst + n] = key[:, src : src + n].detach()
                value_buffer[:, dst : dst + n] = value[:, src : src + n].detach()
        if fast:
            start, end = self.view
            return key_buffer[:, start:end], value_buffer[:, start:end]
        if not self.read_ranges:
            return key, value
        cached_key, cached_value = self._cached(layer)
        return torch.cat([cached_key, key], dim=1), torch.cat([cached_value, value], dim=1)

    def _cached(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The visible cached K/V, copied out of the buffer. Under autograd the copy is kept per layer, so a
        gradient-checkpointing recompute at backward time attends to what the forward saw, even after later chunks
        have overwritten the ring."""
        if layer in self._saved:
            return self._saved[layer]
        key_buffer, value_buffer = self.cache.keys[layer], self.cache.values[layer]
        cached = (torch.cat([key_buffer[:, a:b] for a, b in self.read_ranges], dim=1),
                  torch.cat([value_buffer[:, a:b] for a, b in self.read_ranges], dim=1))
        if torch.is_grad_enabled():
            self._saved[layer] = cached
        return cached


class KVCache:
    """Per-layer K/V buffers of `policy.window` latent frames with named slots.

    Each stored frame remembers its RoPE frame position, so tests and the switching code can check exactly
    what the cache holds (`positions(slot)`).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        frame_tokens: int,
        num_heads: int,
        head_dim: int,
        policy: WindowPolicy = WindowPolicy(),
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.policy = policy
        self.frame_tokens = frame_tokens
        shape = (batch_size, policy.window * frame_tokens, num_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._start: dict[KVSlot, int] = {}
        start = 0
        for slot in KVSlot:
            self._start[slot] = start
            start += policy.capacity(slot)
        # Per slot, stored frames oldest first as (buffer frame, RoPE position).
        self._frames: dict[KVSlot, deque[tuple[int, int]]] = {slot: deque() for slot in KVSlot}
        self._ring_next = 0  # next HISTORY frame to write, relative to the slot start

    # -- inspection -------------------------------------------------------------------------------------
    def num_frames(self, slot: KVSlot | None = None) -> int:
        slots = KVSlot if slot is None else (slot,)
        return sum(len(self._frames[s]) for s in slots)

    def positions(self, slot: KVSlot) -> list[int]:
        """RoPE frame positions stored in `slot`, oldest first."""
        return [pos for _, pos in self._frames[slot]]

    def free(self, slot: KVSlot) -> int:
        return self.policy.capacity(slot) - len(self._frames[slot])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # -- operations -------------------------------------------------------------------------------------
    def clear(self, slots: KVSlot | Iterable[KVSlot] | None = None) -> None:
        """Withdraw slots (all when None). Only bookkeeping: stale values are never read again."""
        for slot in ALL_SLOTS if slots is None else ((slots,) if isinstance(slots, KVSlot) else slots):
            self._frames[slot].clear()
            if slot is KVSlot.HISTORY:
                self._ring_next = 0

    def make_room(self, frames: int) -> None:
        """FIFO-evict HISTORY so that `frames` more fit (called before a chunk is denoised)."""
        history = self._frames[KVSlot.HISTORY]
        while len(history) > self.policy.history_frames - frames and history:
            history.popleft()

    def plan(
        self,
        positions: Sequence[int],
        write: KVSlot | Sequence[KVSlot] | None = None,
        read: Iterable[KVSlot] | None = None,
    ) -> KVPlan:
        """Plan one forward over frames at RoPE `positions`.

        `write`: None (read-only, e.g. a denoising pass), one slot for all frames (a commit pass), or one
        slot per frame (the joint prefill of [reference, garment]). `read`: slots this call may attend to
        (default all). Frames written to REFERENCE/GARMENT replace what was there; HISTORY evicts FIFO.
        """
        read_slots = ALL_SLOTS if read is None else tuple(read)
        if write is None:
            targets: list[KVSlot] = []
        elif isinstance(write, KVSlot):
            targets = [write] * len(positions)
        else:
            targets = list(write)
            if len(targets) != len(positions):
                raise ValueError(f"write names {len(targets)} slots for {len(positions)} frames")
        for slot in set(targets):
            n = targets.count(slot)
            if n > self.policy.capacity(slot):
                raise ValueError(f"{n} frames do not fit the {slot.value} slot (capacity {self.policy.capacity(slot)})")
            if slot is KVSlot.HISTORY:
                self.make_room(n)
            elif slot is not KVSlot.SINK or self.free(slot) < n:
                self.clear(slot)

        visible = sorted(frame for slot in read_slots for frame, _ in self._frames[slot])
        read_ranges = _merge_runs((frame * self.frame_tokens, self.frame_tokens) for frame in visible)

        if targets:
            own = []
            for slot, position in zip(targets, positions):
                frame = self._reserve(slot)
                self._frames[slot].append((frame, position))
                own.append(frame)
        else:
            own = self._scratch(visible, len(positions))
        view = None
        if own is not None:
            frames = sorted(visible + own)
            if frames[-1] - frames[0] + 1 == len(frames):
                view = (frames[0] * self.frame_tokens, (frames[-1] + 1) * self.frame_tokens)
            runs = [(frame * self.frame_tokens, index * self.frame_tokens, self.frame_tokens)
                    for index, frame in enumerate(own)]
        else:
            runs = []
        return KVPlan(self, tuple(read_ranges), tuple(_merge_write_runs(runs)), bool(targets), view)

    def _scratch(self, visible: list[int], count: int) -> list[int] | None:
        """`count` free buffer frames that make `visible` one contiguous run (a read-only pass writes its K/V there
        and attends over one view), or None. Free frames hold nothing that is read again: evicted or unused."""
        used = {frame for frames in self._frames.values() for frame, _ in frames}
        total = self.policy.window
        if visible:
            gaps = [f for f in range(visible[0], visible[-1] + 1) if f not in visible]
            if gaps:
                candidates = [gaps]
            else:
                candidates = [list(range(visible[-1] + 1, visible[-1] + 1 + count)),
                              list(range(visible[0] - count, visible[0]))]
        else:
            candidates = [list(range(start, start + count)) for start in range(total - count + 1)]
        for frames in candidates:
            if len(frames) == count and all(0 <= f < total and f not in used for f in frames):
                return frames
        return None

    def _reserve(self, slot: KVSlot) -> int:
        start = self._start[slot]
        if slot is not KVSlot.HISTORY:
            return start + len(self._frames[slot])
        frame = start + self._ring_next
        self._ring_next = (self._ring_next + 1) % self.policy.history_frames
        return frame


def _merge_runs(runs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, length) runs sorted by start -> merged [start, end) ranges, so a full cache is one view."""
    merged: list[list[int]] = []
    for start, length in runs:
        if merged and merged[-1][1] == start:
            merged[-1][1] += length
        else:
            merged.append([start, start + length])
    return [(a, b) for a, b in merged]


def _merge_write_runs(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    merged: list[list[int]] = []
    for dst, src, n in runs:
        if merged and merged[-1][0] + merged[-1][2] == dst and merged[-1][1] + merged[-1][2] == src:
            merged[-1][2] += n
        else:
            merged.append([dst, src, n])
    return [tuple(run) for run in merged]
