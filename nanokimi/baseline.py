"""The nanoGPT dense baseline (Karpathy's model.py, same design): learned positions, LayerNorm, causal multi-head
attention through SDPA, GELU MLP 4x, tied embeddings. Same interface as nanokimi.Kimi (forward, generate/stream,
num_params, flops_per_token, context_length, update_expert_bias).

nanoGPT calls the model's context `block_size`, the same name as the training window; here the model's is
`n_positions` (GPT-2's name), so that `--block_size` always means the training window."""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .sampling import generate_tokens


@dataclass
class GPTConfig:
    n_positions: int = 256  # learned positions = the longest context
    vocab_size: int = 65
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2
    bias: bool = False
    context_field: ClassVar[str] = "n_positions"

    def __post_init__(self):
        for name in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def context_length(self):
        return self.n_positions


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head, self.dropout = config.n_head, config.dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0)
        return F.dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x):
        return F.dropout(self.c_proj(F.gelu(self.c_fc(x))), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    has_kv_cache = False  # as nanoGPT: every sampled token recomputes the context

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        if T > self.config.n_positions:
            raise ValueError(f"sequence of {T} tokens exceeds n_positions ({self.config.n_positions})")
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        x = F.dropout(x, self.config.dropout, self.training)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)

    def blocks(self):
        """The transformer blocks: the units FSDP2 shards."""
        return list(self.h)

    def num_params(self):
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "active": total, "embedding": self.wte.weight.numel()}

    def flops_per_token(self, seq_len):
        """6 x parameters that do matmuls (wpe is a lookup; wte counts once, as the tied lm_head) + attention's QK^T
        and PV over the context, as nanoGPT's estimate_mfu."""
        c = self.config
        return 6 * (self.num_params()["total"] - self.wpe.weight.numel()) + 6 * c.n_layer * 2 * c.n_embd * seq_len

    @property
    def context_length(self):
        return self.config.context_length

    # nanoGPT's configure_optimizers: fused AdamW on CUDA only (on CPU, torch's default per-parameter loop)
    fused_adamw_devices = ("cuda",)

    def attention_layers(self):
        return []  # nanoGPT trains with AdamW: no QK-Clip

    def update_expert_bias(self, gamma=1e-3):
        return []  # dense: no experts to balance

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=False, generator=None):
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator))
        return torch.cat([idx] + new, dim=1)

    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=False, generator=None):
        if use_cache:
            raise ValueError("the nanoGPT baseline has no KV cache (as nanoGPT): pass use_cache=False")
        return generate_tokens(self, idx, max_new_tokens, self.config.n_positions, temperature, top_k, top_p, generator)
