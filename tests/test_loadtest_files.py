"""Results on disk: raw data is kept gzip-compressed and read back under its plain name too."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from loadtest.report import RESULTS, compress, json_text, raw, read_json, read_text, write_raw


def test_raw_data_is_written_compressed_and_read_under_either_name(tmp_path: Path) -> None:
    doc = {"requests": [{"ok": True, "ttft": 0.01}], "ttft_p50_ms": float("nan")}
    kept = write_raw(tmp_path / "run.json", json_text(doc))
    assert kept == tmp_path / "run.json.gz" and not (tmp_path / "run.json").exists()
    assert gzip.decompress(kept.read_bytes()).decode() == json_text(doc)
    expected = {"requests": [{"ok": True, "ttft": 0.01}], "ttft_p50_ms": None}  # strict JSON: no NaN
    assert read_json(tmp_path / "run.json") == read_json(kept) == expected
    assert raw(kept) == kept
    again = write_raw(tmp_path / "again.json", json_text(doc))
    assert again.read_bytes() == kept.read_bytes()  # the same data gives the same bytes


def test_a_finished_log_is_compressed_in_place(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("ready\nstopped by SIGINT\n")
    assert compress(log) == tmp_path / "server.log.gz"
    assert not log.exists()
    assert read_text(log) == "ready\nstopped by SIGINT\n"


def test_a_plain_result_is_read_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text('{"levels": []}')
    assert read_json(tmp_path / "summary.json") == {"levels": []}


def per_request(doc: Any) -> bool:
    """Whether a result holds one record per request somewhere (a bench report's "requests")."""
    if isinstance(doc, dict):
        rows = doc.get("requests")
        if isinstance(rows, list) and rows and isinstance(rows[0], dict):
            return True
        return any(per_request(v) for v in doc.values())
    return isinstance(doc, list) and any(per_request(v) for v in doc)


def test_stored_results_keep_raw_data_compressed_and_readable() -> None:
    plain_raw = [
        str(p.relative_to(RESULTS))
        for p in RESULTS.rglob("*")
        if p.suffix == ".log" or (p.suffix == ".json" and per_request(json.loads(p.read_text())))
    ]
    assert plain_raw == []
    for kept in RESULTS.rglob("*.gz"):
        assert read_text(kept), kept
