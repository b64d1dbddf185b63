"""``--dtype auto``'s rule as a pure function, and the two facts it reads (no model is loaded)."""

from __future__ import annotations

import json

import pytest
from negspace_node.dtype import checkpoint_dtype, choose_dtype, cpu_bf16_flags, resolve_dtype

AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
AMX = "flags\t\t: fpu avx512f amx_bf16 amx_tile\n"
PLAIN = "flags\t\t: fpu sse2 avx2 avx512f\n"


@pytest.mark.parametrize("requested", ["float32", "bfloat16", "float16"])
def test_an_explicit_dtype_is_kept(requested):
    assert choose_dtype(requested, on_cpu=True, cpu_flags=["avx512_bf16"], weights="bfloat16") == requested
    assert choose_dtype(requested, on_cpu=False, cpu_flags=[], weights=None) == requested


def test_auto_on_a_gpu_keeps_the_checkpoints_dtype():
    assert choose_dtype("auto", on_cpu=False, cpu_flags=[], weights="bfloat16") == "auto"


@pytest.mark.parametrize(("flags", "weights", "expected"), [
    (["avx512_bf16"], "bfloat16", "bfloat16"),
    (["amx_bf16"], "bfloat16", "bfloat16"),
    ([], "bfloat16", "float32"),                 # no bf16 units: emulated bf16 is slower
    (["avx512_bf16"], "float32", "float32"),     # never lower the checkpoint's precision
    (["avx512_bf16"], "float16", "float32"),
    (["avx512_bf16"], None, "float32"),          # unknown weights (a hub id): the exact choice
])
def test_auto_on_a_cpu(flags, weights, expected):
    assert choose_dtype("auto", on_cpu=True, cpu_flags=flags, weights=weights) == expected


def test_cpu_flags_are_read_from_cpuinfo():
    assert cpu_bf16_flags(AVX512_BF16) == ["avx512_bf16"]
    assert cpu_bf16_flags(AMX) == ["amx_bf16"]
    assert cpu_bf16_flags(PLAIN) == []
    assert cpu_bf16_flags("") == []


def test_checkpoint_dtype_reads_either_config_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    assert checkpoint_dtype(str(tmp_path)) == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    assert checkpoint_dtype(str(tmp_path)) == "float32"
    assert checkpoint_dtype(str(tmp_path / "missing")) is None
    assert checkpoint_dtype("org/hub-id") is None


def test_resolve_dtype_uses_this_machines_flags(tmp_path, monkeypatch):
    import negspace_node.dtype as mod

    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    monkeypatch.setattr(mod, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    assert resolve_dtype("auto", str(tmp_path), on_cpu=True) == "bfloat16"
    monkeypatch.setattr(mod, "cpu_bf16_flags", lambda: [])
    assert resolve_dtype("auto", str(tmp_path), on_cpu=True) == "float32"
    assert resolve_dtype("auto", str(tmp_path), on_cpu=False) == "auto"
    assert resolve_dtype("float32", str(tmp_path), on_cpu=True) == "float32"


def test_the_transformers_engine_maps_the_rule_to_torch(tmp_path, monkeypatch):
    import negspace_node.dtype as mod
    import torch
    from negspace_node.engines.transformers import torch_dtype

    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    monkeypatch.setattr(mod, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    assert torch_dtype("auto", "cpu", str(tmp_path)) is torch.bfloat16
    assert torch_dtype("float32", "cpu", str(tmp_path)) is torch.float32
    assert torch_dtype("auto", "cuda", str(tmp_path)) == "auto"
