"""Model spec resolution, local directories, the GGUF cache, and clear errors."""

from __future__ import annotations

import pytest
import torch

from sinkscope.errors import ModelLoadError, UnsupportedArchitectureError
from sinkscope.models import load as load_mod
from sinkscope.models.adapters import get_adapter, supported_architectures
from sinkscope.models.load import load_model, resolve_model_spec
from sinkscope.models.tiny import save_tiny


def test_local_directory_roundtrip(tmp_path) -> None:
    d = save_tiny(str(tmp_path / "m"), "qwen2")
    model, tok = load_model(d)
    assert model.config.model_type == "qwen2" and not model.training
    assert model.sinkscope_source.kind == "directory"
    out = model(torch.tensor([[4, 5, 6]])).logits
    assert out.shape == (1, 3, 99)


def test_bad_specs_fail_with_one_line(tmp_path, monkeypatch) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model_spec(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model_spec("./no/such/dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file")
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match="could not read GGUF"):
        load_model(tmp_path / "broken.gguf")
    assert not any((tmp_path / "cache").rglob("config.json"))  # nothing half-written
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="unknown model 'nobody/no-such-model'") as e:
        load_model("nobody/no-such-model")
    assert "\n" not in str(e.value)


def test_gguf_cache_is_keyed_by_hash_and_reused(tmp_path, monkeypatch) -> None:
    """The first load dequantises into cache/gguf/<sha256>; the second reads it without dequantising."""
    src = tmp_path / "fake.gguf"
    src.write_bytes(b"GGUF-ish bytes")
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_dequantise(path, target):
        calls.append(path)
        save_tiny(str(target), "llama")

    monkeypatch.setattr(load_mod, "_dequantise_gguf", fake_dequantise)
    m1, _ = load_model(src)
    m2, _ = load_model(src)
    assert len(calls) == 1
    digest = load_mod.file_sha256(src)
    assert (tmp_path / "cache" / "gguf" / digest / "config.json").is_file()
    assert m2.sinkscope_source.sha256 == digest


def test_unsupported_architecture_lists_supported() -> None:
    class Cfg:
        model_type = "mamba"

    class M(torch.nn.Module):
        config = Cfg()

    with pytest.raises(UnsupportedArchitectureError) as e:
        get_adapter(M())
    for arch in ("llama", "gpt2", "gpt_neox"):
        assert arch in str(e.value)
    assert "llama" in supported_architectures()


def test_adapter_facts(tiny) -> None:
    arch, model = tiny
    a = get_adapter(model)
    assert a.n_heads == 4 and a.n_heads % a.n_kv_heads == 0
    assert a.attention_layers and all(0 <= l < a.n_layers for l in a.attention_layers)
    assert a.scaling(a.attention_layers[0]) > 0
    assert (a.sink_logits(a.attention_layers[0]) is not None) == (arch == "gpt_oss")
