"""loadtest/defaults.py's figures over rounds: medians per figure and each round's ratio."""

from __future__ import annotations

from loadtest.defaults import medians, round_ratio, table


def rounds() -> list[dict[str, dict[str, dict[str, float]]]]:
    return [
        {
            "vllm serve": {"4": {"output_throughput": 1000.0, "median_ttft_ms": 20.0, "failed": 0}},
            "switchyard up": {"4": {"output_throughput": 900.0, "median_ttft_ms": 25.0, "failed": 0}},
        },
        {
            "vllm serve": {"4": {"output_throughput": 800.0, "median_ttft_ms": 30.0, "failed": 0}},
            "switchyard up": {"4": {"output_throughput": 880.0, "median_ttft_ms": 24.0, "failed": 1}},
        },
        {
            "vllm serve": {"4": {"output_throughput": 1200.0, "median_ttft_ms": 22.0, "failed": 0}},
            "switchyard up": {"4": {"output_throughput": 1100.0}},  # a run without TTFT figures
        },
    ]


def test_medians_take_each_figure_over_the_rounds_that_have_it() -> None:
    result = medians(rounds())
    assert result["vllm serve"]["4"]["output_throughput"] == 1000.0
    assert result["switchyard up"]["4"]["output_throughput"] == 900.0
    assert result["switchyard up"]["4"]["median_ttft_ms"] == 24.5  # of the two rounds that had it
    assert result["switchyard up"]["4"]["failed"] == 0.5


def test_each_round_is_compared_with_vllm_in_the_same_round() -> None:
    ratios = [round_ratio(r, "switchyard up", "vllm serve", "4") for r in rounds()]
    assert ratios == ["0.90", "1.10", "0.92"]
    assert round_ratio({"a": {"4": {}}, "b": {"4": {"output_throughput": 5.0}}}, "a", "b", "4") == "-"


def test_the_table_gives_ratios_against_the_first_server() -> None:
    text = table(medians(rounds()), [4])
    row = next(line for line in text.splitlines() if "output tok/s" in line)
    assert row.split("|")[3:6] == [" 1000.0 ", " 900.0 ", " 0.90 "]
