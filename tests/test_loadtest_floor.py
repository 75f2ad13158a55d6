"""The floor study (loadtest/floor.py): the gateway's stack alone, measured as pathcost measures it."""

from __future__ import annotations

import re

import pytest

from loadtest import floor


def test_the_floor_study_streams_every_event_and_prints_its_split(capsys: pytest.CaptureFixture[str]) -> None:
    # The client checks every answer: the chunks asked for and [DONE], or the study fails.
    assert floor.main(["--streams", "8", "--requests", "600", "--events", "1,8"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (1|8) \| 600 \| \d+ \| (\d+\.\d{3}) \|$", out, re.M)
    assert [events for events, _ in rows] == ["1", "8"] and all(float(ms) > 0 for _, ms in rows), out
    # With two levels the fit is exact; on a noisy host its split may lean either way.
    assert re.search(r"floor at 8 streams: -?[\d.]+ ms per request, -?[\d.]+ ms per SSE event", out), out
