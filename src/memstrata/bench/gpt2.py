"""GPT-2-style decoders for the optimizer-state bench, written with torch.nn (nothing downloaded).

The four published sizes (layers, width, heads; vocabulary 50257, context 1024,
tied input/output embedding, pre-LayerNorm blocks, GELU-tanh MLP of 4x width),
randomly initialised as GPT-2 does (normal, std 0.02), plus ``gpt2-tiny`` for
tests.  Parameter counts: 124.4M, 354.8M, 774.0M, 1557.6M (`param_count`).

>>> m = build("gpt2-tiny")
>>> logits = m(torch.zeros(2, 16, dtype=torch.long))
>>> tuple(logits.shape), param_count("gpt2-tiny") == sum(p.numel() for p in m.parameters())
((2, 16, 512), True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    d_model: int
    n_head: int
    vocab: int = 50257
    ctx: int = 1024


GPT2_MODELS = {
    "gpt2-124m": GPTConfig(12, 768, 12),
    "gpt2-350m": GPTConfig(24, 1024, 16),
    "gpt2-774m": GPTConfig(36, 1280, 20),
    "gpt2-1.5b": GPTConfig(48, 1600, 25),
    "gpt2-tiny": GPTConfig(2, 64, 4, vocab=512, ctx=128),  # tests
}


def is_gpt2(name: str | None) -> bool:
    return name in GPT2_MODELS


def param_count(name: str) -> int:
    """Parameters of `name` (tied embedding counted once), from the configuration alone."""
    c = GPT2_MODELS[name]
    d = c.d_model
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    return c.vocab * d + c.ctx * d + c.n_layer * block + 2 * d


class Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        d = c.d_model
        self.n_head = c.n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.config = c
        self.wte, self.wpe = nn.Embedding(c.vocab, c.d_model), nn.Embedding(c.ctx, c.d_model)
        self.h = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.lm_head = nn.Linear(c.d_model, c.vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for blk in self.h:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


def build(name: str, device: torch.device | str | None = None) -> GPT:
    """`name` randomly initialised, its parameters made on `device` (default: the CPU).

    [Note: building on the device] A 1.5B model initialised on the CPU and then moved takes
    ~10-20 s of single-pass `normal_` and a 6 GB host-to-device copy; made directly on a CUDA
    device (under ``torch.device``) it takes well under a second.  The values then come from that
    device's generator (seeded by ``torch.manual_seed`` like the CPU's), so they differ from a
    CPU build, but every contender of a run builds the same way.  On the CPU (or ``device=None``)
    this is exactly the old build: nothing changes for CPU results and tests."""
    if name not in GPT2_MODELS:
        raise ValueError(f"unknown GPT-2 model {name!r}: choose from {', '.join(GPT2_MODELS)}")
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type == "cpu":
        return GPT(GPT2_MODELS[name])
    with dev:
        return GPT(GPT2_MODELS[name])


__all__ = ["GPT2_MODELS", "GPTConfig", "GPT", "build", "is_gpt2", "param_count"]
