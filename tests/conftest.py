"""Shared fixtures: deterministic seeds, tiny random models of every supported architecture, the real SmolLM2."""

from __future__ import annotations

import os

import pytest
import torch

from sinkscope.models.random_hf import TINY_ARCHITECTURES, tiny_model


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=TINY_ARCHITECTURES)
def tiny(request: pytest.FixtureRequest):
    """(model_type, model): a tiny random-initialised model, fp32, eval mode."""
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (model, tokenizer), loaded once per session."""
    from sinkscope.models.load import load_model

    return load_model("smollm2-135m")


def _chromium_missing() -> bool:
    from sinkscope.report.browser import BrowserUnavailable, find_chromium

    try:
        find_chromium()
    except BrowserUnavailable:
        return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests need a CUDA device; ``browser`` tests need Chromium (``apt-get install chromium``): both are
    skipped with the reason when absent. CI installs Chromium and sets ``SINKSCOPE_REQUIRE_BROWSER=1``, so there
    a missing browser fails the browser tests instead of skipping them."""
    if not (torch.cuda.is_available() or os.environ.get("SINKSCOPE_GPU")):
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    if not os.environ.get("SINKSCOPE_REQUIRE_BROWSER") and _chromium_missing():
        skip = pytest.mark.skip(reason="needs Chromium for the headless page check: apt-get install chromium")
        for item in items:
            if "browser" in item.keywords:
                item.add_marker(skip)


def _llama_twin(model, *, max_positions: int, attn_implementation: str | None = None):
    """The HF Llama with the weights of a rope / rmsnorm / swiglu tinygpt (no biases, untied), in eval mode.

    Checks that every tinygpt weight found its Llama slot (only the rotary buffers stay the Llama's own).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.cfg
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=max_positions, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        **extra)).eval()
    sd = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.norm_f.weight,
          "lm_head.weight": model.head.weight}
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        qw, kw, vw = block.attn.qkv.weight.split(cfg.d_model, dim=0)
        sd.update({p + "self_attn.q_proj.weight": qw, p + "self_attn.k_proj.weight": kw,
                   p + "self_attn.v_proj.weight": vw, p + "self_attn.o_proj.weight": block.attn.proj.weight,
                   p + "mlp.gate_proj.weight": block.mlp.gate.weight, p + "mlp.up_proj.weight": block.mlp.up.weight,
                   p + "mlp.down_proj.weight": block.mlp.down.weight, p + "input_layernorm.weight": block.norm1.weight,
                   p + "post_attention_layernorm.weight": block.norm2.weight})
    missing, unexpected = hf.load_state_dict({k: v.detach() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf


@pytest.fixture(scope="session")
def llama_twin():
    """``llama_twin(tinygpt, max_positions=..., attn_implementation=None)`` -> the weight-identical HF Llama."""
    return _llama_twin
