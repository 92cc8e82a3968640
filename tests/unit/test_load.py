"""Model spec resolution, local directories, the GGUF cache, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sinkscope.errors import ModelLoadError, SinkscopeError, UnsupportedArchitectureError
from sinkscope.models import load as load_mod
from sinkscope.models.adapters import get_adapter, supported_architectures
from sinkscope.models.load import load_model, resolve_model_spec
from sinkscope.models.random_hf import save_tiny


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


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch) -> tuple[Path, list]:
    """A fake .gguf file whose dequantisation writes a tiny Llama (cache under tmp_path/cache); returns the file
    and the list of dequantisation calls."""
    src = tmp_path / "fake.gguf"
    src.write_bytes(b"GGUF-ish bytes")
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path / "cache"))
    calls: list = []

    def fake_dequantise(path, target):
        calls.append(path)
        save_tiny(str(target), "llama")

    monkeypatch.setattr(load_mod, "_dequantise_gguf", fake_dequantise)
    return src, calls


def test_gguf_cache_is_keyed_by_hash_and_reused(tmp_path, fake_gguf) -> None:
    """The first load dequantises into cache/gguf/<sha256>; the second reads it without dequantising."""
    src, calls = fake_gguf
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


def test_from_pretrained_kwargs_pass_through(tmp_path) -> None:
    """Hugging Face conventions: dtype by name or as torch_dtype, device_map (nothing moved), local_files_only."""
    d = save_tiny(str(tmp_path / "m"), "llama")
    m, _ = load_model(d, torch_dtype=torch.bfloat16, local_files_only=True, low_cpu_mem_usage=True)
    assert next(m.parameters()).dtype == torch.bfloat16
    m, _ = load_model(d, dtype="bf16")
    assert next(m.parameters()).dtype == torch.bfloat16
    moved = []
    original_to = torch.nn.Module.to

    def spy(self, *args, **kw):
        moved.append(args)
        return original_to(self, *args, **kw)

    torch.nn.Module.to = spy
    try:
        m, _ = load_model(d, device_map="cpu")
        assert next(m.parameters()).device.type == "cpu" and not moved  # accelerate placed it; we moved nothing
        load_model(d)
        assert moved  # without device_map the model is moved to `device` (default CPU)
    finally:
        torch.nn.Module.to = original_to
    assert m.sinkscope_source.to_json()["revision"] is None  # a local directory has no commit


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "float32", "torch_dtype": torch.float32}, "dtype or torch_dtype"),
    ({"device": "cpu", "device_map": "auto"}, "device or device_map"),
    ({"revision": "main"}, "revision applies to hub models"),
    ({"dtype": "float77"}, "dtype 'float77': choose one of"),
    ({"device": "tpu"}, "device 'tpu' is not a device"),  # the library checks the device as the CLI does
])
def test_conflicting_or_bad_load_options(tmp_path, kwargs, message) -> None:
    d = save_tiny(str(tmp_path / "m"), "llama")
    with pytest.raises(SinkscopeError, match=message) as e:
        load_model(d, **kwargs)
    assert "\n" not in str(e.value)


def test_hub_model_records_the_resolved_commit(tmp_path, monkeypatch) -> None:
    """A hub id resolved from the local Hugging Face cache: the model card gets the commit hash, not "main"."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-llama"
    save_tiny(str(repo / "snapshots" / commit), "llama")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    model, _ = load_model("someone/tiny-llama", revision="main", local_files_only=True)
    assert model.sinkscope_source.kind == "hub"
    assert model.sinkscope_source.revision == commit


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_weights_in_a_directory_fail_in_one_line(tmp_path) -> None:
    d = save_tiny(str(tmp_path / "m"), "llama")
    _truncate(tmp_path / "m" / "model.safetensors")
    with pytest.raises(ModelLoadError, match="broken weights file .*truncated") as e:
        load_model(d)
    assert "\n" not in str(e.value)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x05")
    with pytest.raises(ModelLoadError, match="broken weights file"):
        load_model(d)


def test_broken_model_cache_is_rebuilt(fake_gguf, caplog) -> None:
    src, calls = fake_gguf
    load_model(src)
    target, _ = load_mod.gguf_cache_path(src)
    _truncate(target / "model.safetensors")
    with caplog.at_level("WARNING", logger="sinkscope.models.load"):
        model, _ = load_model(src)
    assert len(calls) == 2 and "rebuilding" in caplog.text
    assert model(torch.tensor([[4, 5]])).logits.shape == (1, 2, 99)


def test_pickled_weights_are_refused_unless_asked_for(tmp_path) -> None:
    from sinkscope.models.random_hf import tiny_model

    d = tmp_path / "bin-only"
    save_tiny(str(d), "llama")
    model = tiny_model("llama")
    (d / "model.safetensors").unlink()
    torch.save(model.state_dict(), d / "pytorch_model.bin")  # the pickle format transformers also reads
    with pytest.raises(ModelLoadError, match="pickle weights") as e:
        load_model(d)
    assert "\n" not in str(e.value)
    loaded, _ = load_model(d, use_safetensors=False)  # the user's explicit choice for a file they trust
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_resolving_a_spec_imports_no_torch() -> None:
    """A bad model name is refused before torch / transformers are imported (seconds saved per typo)."""
    import subprocess
    import sys

    code = ("import sys\nfrom sinkscope.models.load import resolve_model_spec\n"
            "try:\n    resolve_model_spec('./no/such/model')\nexcept Exception as e:\n    print(type(e).__name__)\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["ModelLoadError", "False", "False"]
