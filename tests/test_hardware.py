"""The machine record and the memory-bandwidth limit of a decode step: bytes, units, cache."""

from __future__ import annotations

import json

import pytest
import torch

import methods.core.hardware as hw
from tests.conftest import tiny_model

EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme de pse sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2
"""
SAPPHIRE_RAPIDS = """model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_vector_units_come_from_the_cpuinfo_flags():
    assert hw.vector_units(EPYC_AVX2) == ["AVX2"]
    assert hw.vector_units(SAPPHIRE_RAPIDS) == ["AVX2", "AVX512", "AVX512-BF16", "AMX"]
    assert hw.vector_units("model name : something\n") == []  # no flags line (not Linux x86)


def test_native_bf16_falls_back_to_the_flags_without_torch_probes(monkeypatch):
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    monkeypatch.setattr(hw, "_cpuinfo", lambda: SAPPHIRE_RAPIDS)
    assert hw.cpu_has_native_bf16()
    monkeypatch.setattr(hw, "_cpuinfo", lambda: EPYC_AVX2)
    assert not hw.cpu_has_native_bf16()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert hw.cpu_has_native_bf16()  # torch's probe answers where it exists
    from harness.models import cpu_has_native_bf16

    assert cpu_has_native_bf16()  # the harness's name is the same rule


def test_machine_names_the_cpu_its_units_and_threads():
    m = hw.machine("cpu")
    assert m["kind"] == "cpu" and m["threads"] == torch.get_num_threads() and m["torch"] == torch.__version__
    assert set(m["vector_units"]) <= set(hw.UNIT_FLAGS)
    assert hw.machine_label({"kind": "cpu", "name": "AMD EPYC", "vector_units": ["AVX2"], "threads": 2}) == \
        "AMD EPYC (AVX2), 2 threads"
    assert hw.machine_label({"kind": "cpu", "name": "Xeon", "vector_units": ["AVX2", "AVX512-BF16", "AMX"],
                             "threads": 8}) == "Xeon (AMX), 8 threads"
    assert hw.machine_label({"kind": "cuda", "name": "NVIDIA H200", "threads": 16}) == "NVIDIA H200"


def _bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_untied_embedding_table_is_one_row_and_a_tied_one_counts_once_as_the_head():
    untied = tiny_model("llama")  # vocab 97, hidden 64, untied
    embed = untied.get_input_embeddings().weight
    assert hw.step_weight_bytes(untied) == _bytes(untied) - embed.numel() * 4 + 64 * 4
    tied = tiny_model("llama")
    tied.lm_head.weight = tied.get_input_embeddings().weight
    assert len({p.data_ptr() for p in tied.parameters()}) == len(list(tied.parameters()))
    assert hw.step_weight_bytes(tied) == _bytes(tied)  # the table, once, as the head
    separate = tiny_model("llama")  # tied by storage, through two Parameter objects
    separate.lm_head.weight = torch.nn.Parameter(separate.get_input_embeddings().weight.data)
    assert hw.step_weight_bytes(separate) == hw.step_weight_bytes(tied)


def test_kv_bytes_grow_with_context_and_follow_the_dtype():
    model = tiny_model("qwen2")  # 3 layers, 2 KV heads, head dim 16
    per_token = 3 * 2 * 2 * 16 * 4
    assert hw.kv_bytes_per_token(model) == per_token
    assert hw.decode_step_bytes(model, 0) == hw.step_weight_bytes(model)
    assert hw.decode_step_bytes(model, 100) - hw.decode_step_bytes(model, 0) == 100 * per_token
    half = tiny_model("qwen2").to(torch.bfloat16)
    assert hw.decode_step_bytes(half, 100) * 2 == hw.decode_step_bytes(model, 100)
    assert hw.step_limit_ms(269e6, 24.4) == pytest.approx(11.02, abs=0.01)


def test_a_small_read_measures_a_positive_bandwidth():
    found = hw.measure_read_bandwidth("cpu", rounds=1, nbytes=1 << 22)
    assert found.gbs > 0 and found.kernel in hw.CPU_READS


def test_bandwidth_measured_beside_other_work_is_not_cached(tmp_path, monkeypatch, capsys):
    calls = []

    def fake(device, **_):
        calls.append(device)
        return hw.Bandwidth(5.0, "float32 sum", load=0.6) if len(calls) == 1 else hw.Bandwidth(20.0, "float32 sum", 0.0)

    monkeypatch.setattr(hw, "measure_read_bandwidth", fake)
    hw._MEMO.clear()
    assert hw.read_bandwidth_gbs("cpu", cache_dir=tmp_path) == 5.0
    assert not list((tmp_path / "hardware").glob("*.json")) and "not caching" in capsys.readouterr().err
    hw._MEMO.clear()
    assert hw.read_bandwidth_gbs("cpu", cache_dir=tmp_path) == 20.0
    (saved,) = (tmp_path / "hardware").glob("*.json")
    assert json.loads(saved.read_text())["read_gbs"] == 20.0
    hw._MEMO.clear()
    assert hw.read_bandwidth_gbs("cpu", cache_dir=tmp_path) == 20.0 and len(calls) == 2  # from the file
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)  # another thread count: another machine
    hw._MEMO.clear()
    assert hw.read_bandwidth_gbs("cpu", cache_dir=tmp_path) == 20.0 and len(calls) == 3
    hw._MEMO.clear()
