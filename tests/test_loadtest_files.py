"""Results on disk: raw data is kept gzip-compressed and read back under its plain name too."""

from __future__ import annotations

import gzip
from pathlib import Path

from loadtest.report import compress, json_text, raw, read_json, read_text, write_raw


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
