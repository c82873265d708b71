"""Where each generate request that named a ``request_id`` stands, for ``GET /v1/progress/{request_id}`` (the web
page's queue and progress indicator): queued (with its position), running (step N of M), done or failed.

Only the newest ``keep`` ids are remembered; an unknown or forgotten id reads as ``unknown``. Ids are chosen by
clients and reveal only step counts, behind the same API key as everything else.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

__all__ = ["Progress"]


class Progress:
    def __init__(self, keep: int = 1024) -> None:
        self._keep = keep
        self._lock = threading.Lock()
        self._state: OrderedDict[str, dict[str, Any]] = OrderedDict()
        #: ``request_id -> queue position`` (0 = next), set by the app to the worker's
        self.position: Callable[[str], int | None] = lambda _rid: None

    def _set(self, rid: str | None, **fields: Any) -> None:
        if rid is None:
            return
        with self._lock:
            entry = self._state.pop(rid, {})
            entry.update(fields, updated=time.time())
            self._state[rid] = entry
            while len(self._state) > self._keep:
                self._state.popitem(last=False)

    def queued(self, rid: str | None, steps: int) -> None:
        self._set(rid, state="queued", step=0, steps=steps)

    def step(self, rid: str | None, step: int, steps: int) -> None:
        self._set(rid, state="running", step=step, steps=steps)

    def done(self, rid: str | None) -> None:
        self._set(rid, state="done")

    def failed(self, rid: str | None, message: str) -> None:
        self._set(rid, state="failed", error=message)

    def get(self, rid: str) -> dict[str, Any]:
        with self._lock:
            entry = dict(self._state.get(rid, {"state": "unknown"}))
        if entry["state"] == "queued":
            pos = self.position(rid)
            if pos is not None:
                entry["position"] = pos
        entry.pop("updated", None)
        return {"request_id": rid, **entry}
