"""agentbench's figures (pure): the client's per-request record, answers checked against their
schema, and each grammar-held body compared with plain chat of its own length."""

from __future__ import annotations

from typing import Any

from loadtest.agentbench import baseline, held_pct, medians, table
from loadtest.paritycases import PERSON_SCHEMA
from loadtest.vllmbench import records


def test_the_clients_lists_become_one_record_per_request() -> None:
    result = {
        "start_times": [1.0, 1.5],
        "input_lens": [71, 73],
        "output_lens": [4, 0],
        "ttfts": [0.1, 0.0],
        "latencies": [0.4, 0.0],
        "errors": ["", "refused"],
        "generated_texts": ["abcd", ""],
        "itls": [[0.25, 0.5, 0.0], []],
    }
    first, second = records(result)
    assert first == {
        "start": 1.0,
        "prompt_tokens": 71,
        "output_tokens": 4,
        "ttft": 0.1,
        "latency": 0.4,
        "error": "",
        "text": "abcd",
        "chunks": 4,
        "itl_mean": 0.25,
    }
    assert (second["error"], second["chunks"], second["itl_mean"]) == ("refused", 0, None)


def test_an_answer_holds_only_if_it_parses_and_matches() -> None:
    texts = [
        '{"name":"ai","age":4}',
        '{"name":"ai\x15","age":4}',
        '{"name":"ai\\u0015","age":4}',
        '{"age":4}',
        None,
    ]
    assert held_pct(texts, PERSON_SCHEMA) == 40  # a raw control character does not parse
    assert held_pct([], PERSON_SCHEMA) is None


def cell(tok_s: float, cpu: float) -> dict[str, Any]:
    return {"output_throughput": tok_s, "server_cpu_ms_per_request": cpu}


def test_a_grammar_held_body_is_compared_with_plain_chat_of_its_length() -> None:
    assert [baseline(c) for c in ("plain", "tool_required", "plain@tool_required")] == [
        None,
        "plain@tool_required",
        "plain",
    ]
    rounds = [
        {
            server: {
                "plain": cell(4000, 25),
                "tool_required": cell(2000 * k, 20),
                "plain@tool_required": cell(4000 * k, 10),
            }
            for server in ("vllm", "switchyard")
        }
        for k in (1, 2, 3)
    ]
    results = medians(rounds)
    assert results["switchyard"]["tool_required"]["output_throughput"] == 4000
    rows = {tuple(line.split(" | ")[:2]): line.split(" | ") for line in table(results).splitlines()}
    calls = rows[("| tool_required", "output tok/s")]
    assert calls[4:] == ["1.00", "0.50", "0.50 |"]  # beside plain@tool_required, not plain
    cpu = rows[("| plain@tool_required", "server CPU ms / request")]
    assert cpu[4:] == ["1.00", "0.40", "0.40 |"]
