"""tinygpt: a small decoder-only transformer with swappable attention, positions, norms and MLPs, in one file.

Configured by the frozen :class:`TinyGPTConfig` (1:1 with the ``model:`` block of a training YAML). Every
attention layer names its capture points once; forward hooks on them see what the model actually used:

- ``layers.{i}.attn.capture_weights``: attention weights on real keys ``(B, H, Q, K)``;
- ``layers.{i}.attn.capture_slot``: weight on the sink slot ``(B, H, Q)`` (learned key bias, learnable sink
  token, or the virtual key of softmax + 1); called only when the model has one;
- ``layers.{i}.attn.capture_values``: value vectors of real tokens ``(B, H, K, D)``;
- ``layers.{i}.capture_resid``: the residual stream after layer ``i`` for real tokens ``(B, T, d_model)``.

Shapes: B batch, T tokens, H heads, Q queries, K keys, D d_head, V vocabulary.

>>> cfg = TinyGPTConfig(vocab_size=11, block_size=8, n_layers=2, d_model=16, n_heads=2)
>>> TinyGPT(cfg)(torch.zeros(3, 8, dtype=torch.long)).shape
torch.Size([3, 8, 11])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sinkscope.errors import InputError
from sinkscope.models.attention import ATTENTION_FNS

NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
POSITIONS = ("rope", "alibi", "learned", "none")
MLP_KINDS = ("relu", "gelu", "swiglu")
ATTN_BIASES = ("none", "k", "v", "kv")


@dataclass(frozen=True)
class TinyGPTConfig:
    """Architecture of a :class:`TinyGPT`. Invalid combinations raise :class:`InputError` with one line.

    Attributes:
        vocab_size, block_size: vocabulary size V and maximum sequence length T.
        n_layers, d_model, n_heads: depth, width, heads (``d_model % n_heads == 0``).
        mlp: whether blocks have an MLP; ``mlp_kind`` relu | gelu | swiglu; ``d_ff`` hidden width (0: 4*d_model).
        norm: layernorm | rmsnorm; ``norm_position``: pre | post.
        positions: rope | alibi | learned | none.
        attention: a name in ``ATTENTION_FNS`` (softmax, softmax1, sigmoid, sigmoid_norm, relu, elu1, elu1_norm).
        attn_bias: none | k (learned key, zero value, after RoPE) | kv (learned key and value) | v (learned
            vector added to the head output); ``attn_bias_shared``: one bias for all heads instead of per head.
        sink_token: prepend a learnable token embedding at every layer's input (Gu et al.'s "learnable sink
            token"); it is not part of the output.
        window: sliding-window size in tokens (None: full causal attention).
        bias: biases in the linear layers; ``tie_embeddings``: output head shares the token embedding.
        init_std: if set, normal(0, init_std) init of linear/embedding weights; else PyTorch defaults.
    """

    vocab_size: int = 66
    block_size: int = 256
    n_layers: int = 1
    d_model: int = 128
    n_heads: int = 1
    mlp: bool = True
    mlp_kind: str = "relu"
    d_ff: int = 0
    norm: str = "layernorm"
    norm_position: str = "pre"
    positions: str = "learned"
    attention: str = "softmax"
    attn_bias: str = "none"
    attn_bias_shared: bool = False
    sink_token: bool = False
    window: int | None = None
    bias: bool = False
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    init_std: float | None = None

    def __post_init__(self) -> None:
        def choose(name: str, value: str, options: tuple[str, ...]) -> None:
            if value not in options:
                raise InputError(f"model.{name}: unknown value {value!r} (choose from {', '.join(options)})")

        if self.attention not in ATTENTION_FNS:
            close = [n for n in ATTENTION_FNS.names() if n.startswith(self.attention[:4])]
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise InputError(f"model.attention: unknown attention kind {self.attention!r}.{hint} "
                             f"Known: {', '.join(ATTENTION_FNS.names())}")
        for name, value, options in [("norm", self.norm, NORMS), ("norm_position", self.norm_position, NORM_POSITIONS),
                                     ("positions", self.positions, POSITIONS), ("mlp_kind", self.mlp_kind, MLP_KINDS),
                                     ("attn_bias", self.attn_bias, ATTN_BIASES)]:
            choose(name, value, options)
        for name in ("vocab_size", "block_size", "n_layers", "d_model", "n_heads"):
            if getattr(self, name) < 1:
                raise InputError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise InputError(f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}")
        if self.positions == "rope" and self.d_head % 2:
            raise InputError(f"model.positions=rope needs an even d_head, got {self.d_head}")
        if self.window is not None and self.window < 1:
            raise InputError(f"model.window must be >= 1 or null, got {self.window}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_sink_tokens(self) -> int:
        return int(self.sink_token)


class Capture(nn.Module):
    """A named capture point: identity in the forward pass; register forward hooks on it to observe."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(cfg: TinyGPTConfig) -> nn.Module:
    return nn.LayerNorm(cfg.d_model, bias=cfg.bias) if cfg.norm == "layernorm" else RMSNorm(cfg.d_model)


def rope(x: Tensor, theta: float) -> Tensor:
    """Rotary embedding (rotate-half form) at positions ``0..T-1`` of ``x (B, H, T, D)``."""
    T, D = x.shape[-2], x.shape[-1]
    inv = theta ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)  # (D/2,)
    ang = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * inv  # (T, D/2)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype), torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi head slopes ``2^(-8 (h+1) / H)`` (Press et al.)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / n_heads) for h in range(n_heads)])


def attention_mask(T: int, *, window: int | None = None, prefix_len: int = 0,
                   device: torch.device | None = None) -> Tensor:
    """Boolean visibility ``(Q, K)``: causal, optionally a sliding window, optionally a bidirectional prefix."""
    q = torch.arange(T, device=device)[:, None]
    k = torch.arange(T, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask = mask & (q - k < window)
    if prefix_len > 0:
        mask = mask | ((q < prefix_len) & (k < prefix_len))
    return mask


class Attention(nn.Module):
    """Multi-head attention whose operation is ``ATTENTION_FNS[cfg.attention]``, with optional bias slots."""

    slopes: Tensor  # (H,) ALiBi slopes, a buffer registered only when ``cfg.positions == "alibi"``

    def __init__(self, cfg: TinyGPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.fn = ATTENTION_FNS[cfg.attention]
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        n_bias = 1 if cfg.attn_bias_shared else cfg.n_heads
        self.k_bias = nn.Parameter(0.02 * torch.randn(n_bias, cfg.d_head)) if cfg.attn_bias in ("k", "kv") else None
        self.v_bias = nn.Parameter(0.02 * torch.randn(n_bias, cfg.d_head)) if cfg.attn_bias in ("v", "kv") else None
        if cfg.positions == "alibi":
            self.register_buffer("slopes", alibi_slopes(cfg.n_heads), persistent=False)
        self.capture_weights = Capture()
        self.capture_slot = Capture()
        self.capture_values = Capture()

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x (B, T, d_model)``, ``mask (T, T)`` bool -> ``(B, T, d_model)``."""
        cfg, B, T = self.cfg, x.shape[0], x.shape[1]
        H, D, S = cfg.n_heads, cfg.d_head, cfg.n_sink_tokens
        q, k, v = self.qkv(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        if cfg.positions == "rope":
            q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
        logit_bias = None
        if cfg.positions == "alibi":
            pos = torch.arange(T, device=x.device)
            logit_bias = -self.slopes[:, None, None] * (pos[:, None] - pos[None, :]).clamp_min(0)  # (H, Q, K)
        n_slot = 0
        if self.k_bias is not None:  # a prepended key (after RoPE) whose value is zero (k) or learned (kv)
            n_slot = 1
            kb = self.k_bias.expand(H, D)[None, :, None, :].expand(B, H, 1, D)
            vb = (self.v_bias.expand(H, D) if self.v_bias is not None else torch.zeros(H, D, device=x.device))
            k = torch.cat([kb, k], dim=2)
            v = torch.cat([vb[None, :, None, :].expand(B, H, 1, D).to(v.dtype), v], dim=2)
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
            if logit_bias is not None:
                logit_bias = torch.cat([torch.zeros_like(logit_bias[..., :1]), logit_bias], dim=-1)
        w = self.fn(q, k, mask, logit_bias)  # (B, H, T, n_slot + T)
        out = w @ v  # (B, H, T, D)
        if self.v_bias is not None and self.k_bias is None:
            out = out + self.v_bias.expand(H, D)[None, :, None, :]

        # capture points: real queries and keys only; bias key, sink token and virtual key go to the slot
        n_lead = n_slot + S
        w_real = w[:, :, S:, n_lead:]  # (B, H, Q, K)
        self.capture_weights(w_real)
        if n_lead or self.fn.virtual_sink:
            slot = w[:, :, S:, :n_lead].sum(-1)  # (B, H, Q)
            if self.fn.virtual_sink:
                slot = slot + (1 - w[:, :, S:].sum(-1))
            self.capture_slot(slot)
        self.capture_values(v[:, :, n_lead:])
        return self.proj(out.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, cfg: TinyGPTConfig) -> None:
        super().__init__()
        d_ff = cfg.d_ff or 4 * cfg.d_model
        self.kind = cfg.mlp_kind
        self.up = nn.Linear(cfg.d_model, d_ff, bias=cfg.bias)
        self.gate = nn.Linear(cfg.d_model, d_ff, bias=cfg.bias) if cfg.mlp_kind == "swiglu" else None
        self.down = nn.Linear(d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        act = F.relu if self.kind == "relu" else F.gelu
        return self.down(act(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: TinyGPTConfig) -> None:
        super().__init__()
        self.pre = cfg.norm_position == "pre"
        self.n_sink = cfg.n_sink_tokens
        self.norm1, self.attn = make_norm(cfg), Attention(cfg)
        self.norm2 = make_norm(cfg) if cfg.mlp else None
        self.mlp = MLP(cfg) if cfg.mlp else None
        self.capture_resid = Capture()

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        if self.pre:
            x = x + self.attn(self.norm1(x), mask)
            if self.mlp is not None:
                assert self.norm2 is not None  # built together with the MLP
                x = x + self.mlp(self.norm2(x))
        else:
            x = self.norm1(x + self.attn(x, mask))
            if self.mlp is not None:
                assert self.norm2 is not None  # built together with the MLP
                x = self.norm2(x + self.mlp(x))
        self.capture_resid(x[:, self.n_sink:])
        return x


class TinyGPT(nn.Module):
    """Decoder-only transformer: embeddings, ``n_layers`` blocks, (final norm), untied or tied head."""

    def __init__(self, cfg: TinyGPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.positions == "learned" else None
        self.sink = nn.Parameter(0.02 * torch.randn(cfg.d_model)) if cfg.sink_token else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.init_std is not None:
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=cfg.init_std)
                    bias = getattr(m, "bias", None)  # nn.Embedding has none
                    if bias is not None:
                        nn.init.zeros_(bias)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def forward(self, idx: Tensor, prefix_len: int = 0) -> Tensor:
        """``idx (B, T)`` token ids -> logits ``(B, T, V)``; ``prefix_len`` > 0 makes a prefix LM."""
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise InputError(f"sequence length {T} exceeds model.block_size={self.cfg.block_size}")
        x = self.tok_emb(idx)  # (B, T, d_model)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=idx.device))
        S = self.cfg.n_sink_tokens
        if self.sink is not None:
            x = torch.cat([self.sink.expand(B, 1, -1).to(x.dtype), x], dim=1)
        mask = attention_mask(T + S, window=self.cfg.window, prefix_len=prefix_len + S if prefix_len else 0,
                              device=idx.device)
        if S:  # the sink token stays visible to every query, whatever the window
            mask[:, :S] = True
        for block in self.layers:
            x = block(x, mask)
        return self.head(self.norm_f(x[:, S:]))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
