"""Tiny random-initialised models of every supported architecture, built from configs (no download).

Used by the tests and by anyone who wants to try the tools without weights. Learned sinks and output gates are
set large so that a measurement which dropped them would be visibly wrong.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from sinkscope.models.adapters import ARCHITECTURES, supported_architectures

_COMMON: dict[str, Any] = dict(
    hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=64,
    vocab_size=99, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

#: Per-architecture config overrides (sliding windows, soft-capping, partial RoPE, ... made to matter at T ~ 16).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": 5},
    "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1,
              "layer_types": ["full_attention", "sliding_attention"]},
    "qwen3": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "attn_logit_softcapping": 1.5, "sliding_window": 4, "query_pre_attn_scalar": 8,
               "final_logit_softcapping": 30.0},
    "phi3": {"sliding_window": 6, "partial_rotary_factor": 0.5},
    "gpt2": {"n_embd": 32, "n_head": 4, "n_layer": 2, "n_positions": 128, "n_inner": 64,
             "num_key_value_heads": None},
    "gpt_neox": {"rotary_pct": 0.5, "num_key_value_heads": None},
    "opt": {"ffn_dim": 64, "word_embed_proj_dim": 32, "num_key_value_heads": None},
    "gpt_oss": {"head_dim": 8, "num_local_experts": 2, "num_experts_per_tok": 1, "sliding_window": 4,
                "layer_types": ["sliding_attention", "full_attention"]},
    "qwen3_next": {"head_dim": 8, "num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"],
                   "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 16,
                   "shared_expert_intermediate_size": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 2,
                   "linear_key_head_dim": 8, "linear_value_head_dim": 8},
}

TINY_ARCHITECTURES: list[str] = [a for a in TINY_CONFIGS if a in supported_architectures()]


def tiny_config(model_type: str, **overrides: Any):
    """A tiny config of ``model_type`` (2 layers, width 32, 4 heads, 2 kv heads, vocab 99)."""
    kw = {**_COMMON, **TINY_CONFIGS[model_type], **overrides}
    kw = {k: v for k, v in kw.items() if v is not None}
    return AutoConfig.for_model(model_type, **kw)


@torch.no_grad()
def tiny_model(model_type: str, seed: int = 0, attn_implementation: str | None = None, **overrides: Any
               ) -> PreTrainedModel:
    """A random-initialised tiny model in eval mode (default attention: the architecture's default, SDPA where
    supported); learned sinks and gates are made large."""
    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation, dtype=torch.float32)
    spec = ARCHITECTURES[model_type]
    from sinkscope.models.adapters import get_adapter

    adapter = get_adapter(model)
    for l in adapter.attention_layers:
        attn = adapter.attention_module(l)
        if spec.sink_param:  # a learned sink that takes a visible share of attention
            getattr(attn, spec.sink_param).copy_(torch.linspace(-1.0, 3.0, adapter.n_heads))
        if spec.gated_q:  # make the output gate saturate (many closed entries)
            q = adapter.projection_modules(l)["q"]
            w = q.weight.view(adapter.n_heads, 2, adapter.d_head, -1)
            w[:, 1] *= 25.0
    model.eval()
    return model


#: Words of the tiny word-level tokenizer (ids 4..98; 0-3 are <pad>, <s>, </s>, <unk>).
TINY_WORDS: list[str] = (
    "the a an of to in and is was it for on with as at by from that this be are or not but his her they "
    "we you he she i my your our their its one two three four five six seven eight nine ten cat dog bird "
    "fish tree house city river sea sun moon star poem word book song red blue green big small old new "
    "good bad run walk eat see say go come make take know think . , ! ? "
    "seem feel try leave call . , ! ?"
).split()[:95]


def tiny_tokenizer():
    """A word-level fast tokenizer over `TINY_WORDS` (vocab 99) with BOS/EOS/PAD tokens; adds no BOS itself."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in TINY_WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_tiny(directory: str, model_type: str = "llama", seed: int = 0) -> str:
    """Write a tiny model plus tokenizer as a Hugging Face directory (for CLI tests and demos)."""
    model = tiny_model(model_type, seed=seed)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
