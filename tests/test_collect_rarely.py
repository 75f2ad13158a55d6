"""Garbage collection of the gateway's and worker's processes (control/serve.py)."""

from __future__ import annotations

import gc
import subprocess
import sys

from control.serve import YOUNG_COLLECTION, collect_rarely


def test_the_youngest_generation_is_collected_rarely_and_the_older_ones_as_before() -> None:
    script = (
        "import gc; before = gc.get_threshold()\n"
        "from control.serve import collect_rarely; collect_rarely()\n"
        "print(*before, *gc.get_threshold())"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    young, older, oldest, *after = (int(n) for n in done.stdout.split())
    assert after == [YOUNG_COLLECTION, older, oldest] and young * 10 < YOUNG_COLLECTION


def test_a_request_sized_burst_of_short_lived_objects_triggers_no_collection() -> None:
    saved = gc.get_threshold()
    counts: list[int] = []
    gc.callbacks.append(lambda phase, info: counts.append(info["generation"]) if phase == "start" else None)
    try:
        collect_rarely()
        gc.collect()
        # Thousands of objects alive at once, as a wave of requests holds: at Python's default
        # of 700 this collects the youngest generation three times.
        held = [{"id": i, "text": str(i)} for i in range(2_500)]
        del held
        assert counts.count(0) <= 1, counts
    finally:
        gc.callbacks.pop()
        gc.set_threshold(*saved)
