"""What a worker's ``/readyz`` and ``/healthz`` answer (served beside ``/metrics`` on its port).

Ready: the engine is loaded and warm, and the worker takes jobs (not while it drains). Alive: its
event loop still turns, as the heartbeat it sends from there shows; a worker whose loop is stuck is
of no use however well its threads answer HTTP. While the engine loads (minutes for a big model)
nothing has beaten yet, and that counts as alive.
"""

from __future__ import annotations

import time


class Health:
    def __init__(self, stale_after: float) -> None:
        self._stale_after = stale_after
        self._beat: float | None = None
        self.serving = False
        self.draining = False

    def beat(self) -> None:
        self._beat = time.monotonic()

    def ready(self) -> bool:
        return self.serving and not self.draining

    def alive(self) -> bool:
        return self._beat is None or time.monotonic() - self._beat < self._stale_after
