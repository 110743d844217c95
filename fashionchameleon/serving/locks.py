"""Locks that stay usable in a forked ZeroGPU worker.

A fork copies each lock in whatever state some other thread of the server held it at that moment; a copy taken
mid-request would stay locked in the worker for good, since the thread that would release it does not exist there.
So every serving object that owns locks is a `ForkSafe`, and each forked child makes them all afresh.
"""

from __future__ import annotations

import abc
import os
import weakref


class ForkSafe(abc.ABC):
    """Owner of locks: `_reset_locks` makes them, at construction and again in each forked child."""

    def __init__(self) -> None:
        self._reset_locks()
        _OWNERS.add(self)

    @abc.abstractmethod
    def _reset_locks(self) -> None:
        """Make every lock this object owns, unlocked."""


_OWNERS: weakref.WeakSet[ForkSafe] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for owner in _OWNERS:
        owner._reset_locks()


os.register_at_fork(after_in_child=_reset_after_fork)
