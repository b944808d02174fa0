"""Loaded models kept for the length of one build (or one command), then released.

Loading a tagger or a segmentation model takes seconds and hundreds of megabytes. The
engine calls a component's ``close()`` after each part's stage, but a build runs the
same stage for the face and every body; reloading per part would multiply the start-up
cost. So model-backed plugins keep their models in a :class:`ModelCache` and clear it in
the ``build_finished`` hook (and commands clear it when they end): one session per
model per build.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any


class ModelCache:
    """Models by key, created once under a lock (stages call in from worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[Hashable, Any] = {}

    def get(self, key: Hashable, factory: Callable[[], Any]) -> Any:
        with self._lock:
            if key not in self._models:
                self._models[key] = factory()
            return self._models[key]

    def __len__(self) -> int:
        return len(self._models)

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
