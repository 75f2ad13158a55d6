"""How a worker configures vLLM on a CPU host where nobody sized the KV cache (pure, no engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.vllm_engine import (
    MIN_CPU_KV_CACHE,
    cpu_kv_cache_bytes,
    cxx_compiler,
    model_threads,
    sized_cpu_kv_cache,
    skips_compilation,
    weight_bytes,
)

GIB = 2**30


def test_half_of_what_the_weights_leave_free() -> None:
    assert cpu_kv_cache_bytes(available=10 * GIB, weights=2 * GIB) == 4 * GIB
    assert cpu_kv_cache_bytes(available=GIB, weights=2 * GIB) == MIN_CPU_KV_CACHE


def test_weights_are_counted_from_the_model_directory(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "tokenizer.json").write_bytes(b"x" * 5000)
    assert weight_bytes(str(tmp_path)) == 1000
    assert weight_bytes("no-such-org/no-such-model") == 0


def test_a_size_chosen_by_the_operator_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    chosen = {"kv_cache_memory_bytes": 123}
    assert sized_cpu_kv_cache(str(tmp_path), chosen) == chosen
    sized = sized_cpu_kv_cache(str(tmp_path), {"max_num_seqs": 4})
    assert sized["max_num_seqs"] == 4 and sized["kv_cache_memory_bytes"] >= MIN_CPU_KV_CACHE
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")  # vLLM's own setting: left to vLLM
    assert "kv_cache_memory_bytes" not in sized_cpu_kv_cache(str(tmp_path), {})


def test_model_threads_share_the_host_less_a_core_unless_the_operator_chose() -> None:
    assert model_threads(cpus=2) == 1  # the other core runs the scheduler, gateway, Redis
    assert model_threads(cpus=16) == 15
    assert model_threads(cpus=8, workers=2) == 3
    assert model_threads(cpus=1) == 1
    assert model_threads(cpus=2, workers=4) == 1  # never zero
    assert model_threads(cpus=8, workers=2, configured="3") == 3
    assert model_threads(cpus=8, workers=2, configured="0") == 1
    assert model_threads(cpus=8, workers=2, configured="4,2") == 3  # not a count: the share less one


@pytest.mark.parametrize(
    ("cpu", "configured", "compiler", "eager"),
    [
        (False, None, None, False),  # a GPU: compiled, as vllm serve ships
        (True, None, "/usr/bin/g++", False),  # a CPU host that can compile does
        (True, None, None, True),  # one without a compiler (a slim image) runs eagerly, not fails
        (True, False, None, False),  # what the operator chose wins either way
        (False, True, None, True),
        (True, True, "/usr/bin/g++", True),
    ],
)
def test_the_engine_compiles_wherever_it_can_unless_the_operator_chose(
    cpu: bool, configured: bool | None, compiler: str | None, eager: bool
) -> None:
    assert skips_compilation(cpu, configured, compiler) is eager


def test_the_compiler_is_the_one_torch_would_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cxx = tmp_path / "my-c++"
    cxx.write_text("#!/bin/sh\n")
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    assert cxx_compiler() == str(cxx)
    monkeypatch.setenv("CXX", str(tmp_path / "missing"))
    assert cxx_compiler() is None
