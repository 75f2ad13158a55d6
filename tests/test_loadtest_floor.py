"""The floor study (loadtest/floor.py): the gateway's stack alone, measured as pathcost measures it."""

from __future__ import annotations

import re

import pytest

from loadtest import floor


def test_the_floor_study_streams_every_event_and_fits_its_split(capsys: pytest.CaptureFixture[str]) -> None:
    # The client checks every answer: the chunks asked for and [DONE], or the study fails.
    assert floor.main(["--streams", "8", "--requests", "400", "--events", "1,16"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\| 1 \| 400 \| \d+ \| \d+\.\d{3} \|$", out, re.M), out
    found = re.search(r"floor at 8 streams: (-?[\d.]+) ms per request, (-?[\d.]+) ms per SSE event", out)
    assert found, out
    per_request, per_event = float(found[1]), float(found[2])
    assert 0 < per_request < 50 and 0 < per_event < per_request, out
