"""Kimi-K2 in one file: Multi-head Latent Attention + DeepSeekMoE, at any size.

Names follow DeepSeek-V3 / Kimi-K2's config.json and Hugging Face's DeepseekV3 checkpoint layout, so a reader can
hold this file next to the paper (arXiv 2507.20534) and `../shared/kimi-k2.md`. Kimi Linear (arXiv 2510.26692) is the
same model with `layer_types` naming KDA layers (kda.py) beside the MLA ones.
Shapes in comments: B batch, T sequence, H hidden_size, nh heads, E routed experts, K experts per token.
"""

import math
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, distribute_tensor

from .sampling import generate_tokens
from .grouped_gemm import grouped_matmul
from .kda import CHUNK, KDA, KDACache

LAYER_TYPES = ("full_attention", "linear_attention")  # transformers' names: softmax attention, KDA


@dataclass
class KimiConfig:
    vocab_size: int = 65
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    q_lora_rank: int | None = 96  # None (or 0, DeepSeek-V3's code's spelling): one direct q_proj (V2-Lite)
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    intermediate_size: int = 384  # dense SwiGLU width (layers < first_k_dense_replace)
    moe_intermediate_size: int = 128  # width of each routed and shared expert
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    first_k_dense_replace: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.827
    max_position_embeddings: int = 256
    rope_theta: float = 50000.0
    rope_scaling: dict | None = None  # None, or a YaRN dict as in Kimi-K2's config.json
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # training-only knobs
    dropout: float = 0.0
    aux_loss_alpha: float = 1e-4  # sequence-wise balance loss coefficient (0 disables)
    attention: str = "mla"  # "mha": the MLA -> MHA ablation (standard multi-head attention, same head dims)
    # Kimi Linear: per layer "full_attention" (MLA, or MHA per `attention`) or "linear_attention" (KDA); None: all
    # full_attention, as Kimi-K2. Kimi-Linear-48B-A3B: 3 KDA layers, then 1 MLA, repeated
    layer_types: list | None = None  # per layer, e.g. '["linear_attention", "full_attention"]'; None: all MLA
    linear_num_heads: int = 4  # KDA heads
    linear_head_dim: int = 32  # KDA head dim (keys and values)
    linear_conv_kernel_dim: int = 4  # KDA's short causal convolution, in tokens
    mla_use_nope: bool = False  # full-attention layers without rotary position (Kimi Linear: KDA carries order)
    extra: dict = field(default_factory=dict, repr=False)  # unknown keys kept from imported configs
    context_field: ClassVar[str] = "max_position_embeddings"  # the setting that bounds the context (as GPTConfig)

    def __post_init__(self):
        if self.q_lora_rank == 0:  # as None (a TOML file cannot say None)
            self.q_lora_rank = None
        check_config(self)  # the rules, after the model (end of file)

    @property
    def qk_head_dim(self):
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def layer_type(self, layer_id):
        return "full_attention" if self.layer_types is None else self.layer_types[layer_id]

    @property
    def context_length(self):
        return self.max_position_embeddings


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 (DeepSeek-V3)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def yarn_mscale(scale, mscale=1.0):
    return 0.1 * mscale * math.log(scale) + 1.0 if scale > 1 else 1.0


def yarn_magnitudes(rope_scaling):
    """YaRN's two magnitude corrections, as HF's DeepseekV3 applies them: (softmax scale multiplier, cos/sin
    multiplier). For K2 (mscale = mscale_all_dim = 1, factor 32): (1.813, 1.0)."""
    factor, mscale, mscale_all_dim = (
        rope_scaling["factor"],
        rope_scaling.get("mscale"),
        rope_scaling.get("mscale_all_dim"),
    )
    softmax = yarn_mscale(factor, mscale_all_dim) ** 2 if mscale_all_dim else 1.0
    rope = rope_scaling.get("attention_factor") or (
        yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        if mscale and mscale_all_dim
        else yarn_mscale(factor)
    )
    return softmax, rope


def rope_frequencies(config):
    """Inverse frequencies [d_r/2] of the rope slice, with YaRN's ramp when rope_scaling is set."""
    d, theta = config.qk_rope_head_dim, config.rope_theta
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    if config.rope_scaling is not None:
        rs = config.rope_scaling
        factor, original = rs["factor"], rs["original_max_position_embeddings"]

        def correction_dim(rotations):
            return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(rs.get("beta_fast", 32)), correction_dim(rs.get("beta_slow", 1))
        if rs.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    return freqs


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs (2i, 2i+1) as DeepSeek does (HF rope_interleave=True). x: [..., T, d_r]."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    """What MLA and its MHA ablation share: head dims, softmax scale, causal SDPA for training and prefill, and the
    per-head max logit that QK-Clip needs."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.nh, self.d_nope, self.d_rope, self.d_v = (
            c.num_attention_heads,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
        )
        self.dropout = c.dropout
        self.scale = c.qk_head_dim**-0.5
        if c.rope_scaling is not None:
            self.scale *= yarn_magnitudes(c.rope_scaling)[0]

    def causal_attention(self, q, k, v, record_max_logit=False):
        """q, k: [B, nh, T, d_nope + d_rope], v: [B, nh, T, d_v] -> (o_proj(softmax(scale q k^T, causal) v),
        per-head max logit [nh] for QK-Clip when record_max_logit, else None)."""
        head_max = self.max_logit(q, k) if record_max_logit else None
        # fused SDPA kernels (flash, CPU flash) need v's head dim equal to q/k's, else a T x T math path runs (5x
        # slower at T=1024 on CPU): zero-pad v and drop the padding from the output, which leaves it unchanged
        pad = q.shape[-1] - self.d_v
        y = F.scaled_dot_product_attention(
            q,
            k,
            F.pad(v, (0, pad)) if pad > 0 else v,
            is_causal=True,
            scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
        )
        y = y[..., : self.d_v]
        return F.dropout(self.o_proj(y.transpose(1, 2).flatten(2)), self.dropout, self.training), head_max

    @torch.no_grad()
    def max_logit(self, q, k, chunk=256):
        """Per-head max of scale * q.k over causal pairs. SDPA never returns logits, so recompute them (no softmax),
        in query chunks to bound memory."""
        T = q.shape[2]
        head_max = torch.full((self.nh,), -float("inf"), device=q.device)
        for s in range(0, T, chunk):
            logits = q[:, :, s : s + chunk] @ k.transpose(-1, -2)  # [B, nh, c, T]
            future = torch.ones(logits.shape[-2:], dtype=torch.bool, device=q.device).triu(s + 1)
            head_max = torch.maximum(head_max, logits.masked_fill_(future, -float("inf")).amax(dim=(0, 2, 3)).float())
        return head_max * self.scale  # scale > 0: max(scale * q.k) = scale * max(q.k), one pass less over the logits

    @staticmethod
    def scale_heads_(weight, nh, factors):
        """Multiply head h's rows of `weight` [nh * rows_per_head, in] by factors[h] ([nh] or [nh, rows_per_head]).
        Under FSDP2 `weight` is a DTensor sharded by rows: each rank scales the rows it holds."""
        rows = factors.view(nh, -1).expand(nh, weight.shape[0] // nh).reshape(-1, 1).to(weight.dtype)  # [out, 1]
        if isinstance(weight, DTensor):  # every rank has all factors: each cuts its rows' own (no communication)
            rows = distribute_tensor(rows, weight.device_mesh, weight.placements, src_data_rank=None).to_local()
            weight = weight.to_local()
        weight.mul_(rows)


# start_pos, where a forward's T new tokens sit: an int (every row starts there: training, prefill, one sequence's
# decoding) or a LongTensor [B] (batched decoding, engine.py: each row continues its own cache from its own length)


def continues_cache(start_pos):
    """Whether the new tokens follow tokens already in the cache (decoding), not start it (prefill)."""
    return isinstance(start_pos, torch.Tensor) or start_pos > 0


def token_positions(start_pos, T, device):
    """[T] positions of the new tokens, or [B, T] with per-row starts."""
    if isinstance(start_pos, torch.Tensor):
        return start_pos[:, None] + torch.arange(T, device=device)
    return torch.arange(start_pos, start_pos + T, device=device)


def cache_end(start_pos, T):
    """One past the last position any row's new tokens take: how much of the cache a forward reads."""
    return (int(start_pos.max()) if isinstance(start_pos, torch.Tensor) else start_pos) + T


def write_cache(buffer, start_pos, values):
    """Write values [B, T, ...] into buffer [rows, max_len, ...] at rows 0..B-1, positions start_pos.. of each."""
    B, T = values.shape[:2]
    if isinstance(start_pos, torch.Tensor):
        rows = torch.arange(B, device=values.device)[:, None]
        buffer[rows, token_positions(start_pos, T, values.device)] = values
    else:
        buffer[:B, start_pos : start_pos + T] = values


def decode_mask(start_pos, T, end, device):
    """Query i of a row sits at position start + i and sees keys 0..start + i of [0, end): [T, end] (None for one
    token) for one start, [B, 1, T, end] for per-row starts (rows of other lengths beside it)."""
    if not isinstance(start_pos, torch.Tensor) and T == 1:
        return None
    mask = torch.arange(end, device=device) <= token_positions(start_pos, T, device).unsqueeze(-1)
    return mask if mask.dim() == 2 else mask.unsqueeze(1)


LATENT_NORM_EPS = 1e-6  # the q and kv latents' norms: DeepSeek-V3's RMSNorm default, whatever rms_norm_eps (so in
# DeepSeek's and transformers' code; Kimi Linear's rms_norm_eps is 1e-5, K2's 1e-6)


class MLA(Attention):
    """Multi-head Latent Attention: low-rank q and kv latents, decoupled RoPE with one shared rope key."""

    def __init__(self, config):
        super().__init__(config)
        c = config
        self.d_c, self.q_lora_rank = c.kv_lora_rank, c.q_lora_rank
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, self.nh * c.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(c.q_lora_rank, self.nh * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, self.d_c + self.d_rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.d_c, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.d_c, self.nh * (self.d_nope + self.d_v), bias=False)
        self.o_proj = nn.Linear(self.nh * self.d_v, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache=None, start_pos=0, record_max_logit=False):
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.nh, -1).transpose(1, 2)  # [B, nh, T, d_nope + d_rope]
        q_nope, q_pe = q.split([self.d_nope, self.d_rope], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.d_c, self.d_rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # [B, T, d_c]: the latent that is cached
        k_pe = k_pe.unsqueeze(1)  # [B, 1, T, d_rope]: ONE rope key shared by all heads
        if cos is not None:  # None: mla_use_nope (Kimi Linear), the slice stays shared but unrotated
            q_pe, k_pe = apply_rope(q_pe, cos, sin), apply_rope(k_pe, cos, sin)
        if cache is not None:
            write_cache(cache.kv, start_pos, c_kv)
            write_cache(cache.pe, start_pos, k_pe.squeeze(1))
            if continues_cache(start_pos):  # decoding: attend over the cached latents
                return self.o_proj(self.absorbed_attention(q_nope, q_pe, cache, start_pos)), None
        # training and prefill: materialise per-head keys and values, causal SDPA
        kv = self.kv_b_proj(c_kv).view(B, T, self.nh, -1).transpose(1, 2)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)  # [B, nh, T, d_nope], [B, nh, T, d_v]
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, self.nh, -1, -1)], dim=-1)
        return self.causal_attention(q, k, v, record_max_logit)

    @torch.no_grad()
    def qk_clip_(self, gamma):
        """K2's QK-Clip for MLA, gamma [nh] per head: q nope rows and k nope rows (in kv_b_proj) scale by
        sqrt(gamma), q rope rows by gamma. The shared rope key and the value rows stay untouched, so every logit of
        head h scales by exactly gamma."""
        q_proj = self.q_proj if self.q_lora_rank is None else self.q_b_proj
        root = gamma.sqrt().unsqueeze(1).expand(-1, self.d_nope)  # [nh, d_nope]
        self.scale_heads_(q_proj.weight, self.nh, torch.cat([root, gamma.unsqueeze(1).expand(-1, self.d_rope)], 1))
        self.scale_heads_(self.kv_b_proj.weight, self.nh, torch.cat([root, root.new_ones(self.nh, self.d_v)], 1))

    def absorbed_attention(self, q_nope, q_pe, cache, start_pos):
        """Attention of the T newest tokens (from start_pos) over the cache, with W_UK folded into the query and W_UV
        applied after: MQA in latent space, query/key [c_kv | k_pe] (d_c + d_rope) and value c_kv (d_c), one
        key/value head shared by all heads. Never materialises per-head keys or values."""
        B, _, T, _ = q_nope.shape
        w_kv_b = self.kv_b_proj.weight.view(self.nh, self.d_nope + self.d_v, self.d_c)
        w_uk, w_uv = w_kv_b[:, : self.d_nope], w_kv_b[:, self.d_nope :]  # [nh, d_nope, d_c], [nh, d_v, d_c]
        q_lat = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)  # [B, nh, T, d_c]
        query = torch.cat([q_lat, q_pe], dim=-1)  # [B, nh, T, d_c + d_rope]
        end = cache_end(start_pos, T)
        latent = cache.latent[:B, :end].unsqueeze(1)  # [B, 1, end, d_c + d_rope] = [c_kv | k_pe], no copy
        mask = decode_mask(start_pos, T, end, q_nope.device)
        # the value is c_kv; passing the whole latent (equal q/k/v dims: the fused kernel runs) and keeping the
        # first d_c output columns gives the same result without slicing a copy out of the cache
        o_lat = F.scaled_dot_product_attention(
            query, latent, latent, attn_mask=mask, scale=self.scale, enable_gqa=True
        )[..., : self.d_c]
        o = torch.einsum("bhtc,hdc->bthd", o_lat, w_uv)  # [B, T, nh, d_v]
        return o.flatten(2)


class MLACache:
    """Per-layer inference cache: ONLY the normalised latent c_kv and the roped shared key (d_c + d_rope numbers per
    token per layer), preallocated to the longest sequence. ROWS: its tensors, batch first (every cache names its
    own, so that the engine can move a sequence's row or work on a view of it)."""

    ROWS = ("latent",)

    def __init__(self, config, batch_size, max_len, device, dtype):
        self.d_c = config.kv_lora_rank
        self.latent = torch.zeros(batch_size, max_len, self.d_c + config.qk_rope_head_dim, device=device, dtype=dtype)

    @property
    def kv(self):  # a view: c_kv
        return self.latent[..., : self.d_c]

    @property
    def pe(self):  # a view: the roped k_pe
        return self.latent[..., self.d_c :]


class AttentionKind(NamedTuple):
    layer: type
    cache: type


def attention_kind(config, layer_id):
    """Layer layer_id's attention and cache: KDA for a "linear_attention" layer, else config.attention's (MLA, or the
    MHA ablation: ATTENTION, at the end of the file)."""
    if config.layer_type(layer_id) == "linear_attention":
        return AttentionKind(KDA, KDACache)
    return ATTENTION[config.attention]


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Used as the dense FFN and as the shared expert(s)."""

    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Router: fp32 sigmoid scores; a non-trained per-expert bias picks the experts, unbiased scores weight them."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))

    def forward(self, x):  # x: [N, H] -> weights [N, K], indices [N, K], scores [N, E]
        c = self.config
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        with torch.no_grad():
            choice = scores + self.e_score_correction_bias
            if c.n_group > 1:  # group-limited routing: keep the topk_group groups with the best top-2 sums
                groups = choice.view(len(x), c.n_group, -1)
                group_score = groups.topk(2, dim=-1).values.sum(-1) if groups.shape[-1] > 1 else groups[..., 0]
                keep = torch.zeros_like(group_score, dtype=torch.bool)
                keep.scatter_(1, group_score.topk(c.topk_group, dim=-1).indices, True)
                choice = groups.masked_fill(~keep.unsqueeze(-1), -float("inf")).flatten(1)
            indices = choice.topk(c.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, indices)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * c.routed_scaling_factor, indices, scores


class Experts(nn.Module):
    """E routed SwiGLU experts stored as stacks [E, out, in], run on expert-sorted tokens with one grouped GEMM per
    projection, so the cost depends on tokens x K, not on E.

    The model's one seam for token dispatch: forward takes tokens sorted by expert and the count per expert. Under
    expert parallelism (sharding.expert_parallel) the stacks are DTensors holding this rank's experts, and hooks
    around this call move the tokens to the ranks that own their experts and back."""

    def __init__(self, config):
        super().__init__()
        E, H, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, H))
        self.up_proj = nn.Parameter(torch.empty(E, I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x, counts):  # x: [N, H] sorted by expert; counts: [E] tokens of each expert
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x = x.to(dtype)  # autocast does not cover grouped GEMM: cast by hand
        offsets = counts.cumsum(0).to(torch.int32)  # end of each expert's slice

        def mm(a, w):
            w = w.to_local() if isinstance(w, DTensor) else w  # expert parallel: this rank's experts
            return grouped_matmul(a, w.to(dtype).transpose(-2, -1), offsets)

        return mm(F.silu(mm(x, self.gate_proj)) * mm(x, self.up_proj), self.down_proj)


class MoE(nn.Module):
    """DeepSeekMoE: sum_k w_k * Expert_{i_k}(x) + SharedExperts(x), with aux-loss-free load balancing."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gate = Gate(config)
        self.experts = Experts(config)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        # tokens routed to each expert since the last bias update (summed over training micro-steps, all-reduced
        # under DDP): running statistics, as BatchNorm's, consumed by update_bias once per optimizer step
        self.register_buffer("tokens_per_expert", torch.zeros(config.n_routed_experts), persistent=False)

    def forward(self, x):
        """x [B, T, H] -> (y [B, T, H], sequence balance loss: a scalar in training when aux_loss_alpha > 0, else
        None)."""
        B, T, H = x.shape
        E, K = self.config.n_routed_experts, self.config.num_experts_per_tok
        flat = x.reshape(-1, H)
        weights, indices, scores = self.gate(flat)  # [N, K], [N, K], [N, E]
        slots = indices.flatten()  # [N * K] the expert of each token-slot
        # tokens per expert: bincount, written so its shape is [E] whatever the data (torch.compile traces it)
        counts = torch.zeros(E, dtype=torch.long, device=x.device).index_add_(0, slots, torch.ones_like(slots))
        aux_loss = None
        if self.training:
            self.tokens_per_expert += counts
            aux_loss = self.sequence_balance_loss(scores.view(B, T, E), indices.view(B, T, K))
        order = slots.argsort(stable=True)  # token-slots sorted by expert
        token_of_slot = order // K
        # index_select, not flat[...]: the same rows; its backward (index_add_) is faster on CPU than indexing's
        y = self.experts(flat.index_select(0, token_of_slot), counts)
        y = y.float() * weights.flatten()[order].unsqueeze(-1)
        out = torch.zeros_like(flat, dtype=torch.float32).index_add_(0, token_of_slot, y).type_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(B, T, H), aux_loss

    def sequence_balance_loss(self, scores, indices):
        """DeepSeek-V3 complementary sequence-wise loss: alpha * sum_i f_i P_i per sequence, averaged over the batch."""
        alpha = self.config.aux_loss_alpha
        if alpha == 0:
            return None
        B, T, E = scores.shape
        K = indices.shape[-1]
        selected = torch.zeros(B, E, device=scores.device).scatter_add_(
            1, indices.flatten(1), torch.ones(B, T * K, device=scores.device)
        )
        f = selected * E / (K * T)  # [B, E], no gradient
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # [B, E]
        return alpha * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, gamma):
        """b_i += gamma * sign(mean_load - load_i), centred; returns the load statistics of the step."""
        load = self.tokens_per_expert
        stats = {
            "max_over_mean": (load.max() / load.mean().clamp(min=1)).item(),
            "dead_experts": int((load == 0).sum()),
            "tokens": load.clone(),
        }
        if load.sum() > 0:
            delta = gamma * torch.sign(load.mean() - load)
            self.gate.e_score_correction_bias += delta - delta.mean()
        load.zero_()
        return stats


class Block(nn.Module):
    def __init__(self, config, layer_id):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention_kind(config, layer_id).layer(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = (
            MLP(config.hidden_size, config.intermediate_size)
            if layer_id < config.first_k_dense_replace
            else MoE(config)
        )

    def forward(self, x, cos, sin, cache=None, start_pos=0, record_max_logit=False):
        """-> (x, the MoE's balance loss or None, the attention's per-head max logit or None)."""
        attn, max_logit = self.self_attn(self.input_layernorm(x), cos, sin, cache, start_pos, record_max_logit)
        x = x + attn
        if isinstance(self.mlp, MoE):
            ffn, aux_loss = self.mlp(self.post_attention_layernorm(x))
        else:
            ffn, aux_loss = self.mlp(self.post_attention_layernorm(x)), None
        return x + ffn, aux_loss, max_logit


class Kimi(nn.Module):
    """Kimi-K2: token embedding, Blocks of MLA + (dense SwiGLU | DeepSeekMoE), RMSNorm, untied lm_head.

    `model(idx, targets)` -> (logits, loss) as nanoGPT; `generate`/`stream` sample with the MLA latent cache;
    `update_expert_bias` after each optimizer step; `num_params`, `flops_per_token`. The nanoGPT baseline
    (baseline.GPT) has the same interface."""

    has_kv_cache = True
    fused_adamw_devices = ("cpu", "cuda")  # torch's one-kernel AdamW where it has one (on CPU: ~6x its default loop)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos = sin = None  # no rotary position anywhere (mla_use_nope)
        if not config.mla_use_nope:
            positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
            angles = torch.outer(positions, rope_frequencies(config))  # [max_pos, d_rope/2]
            magnitude = 1.0 if config.rope_scaling is None else yarn_magnitudes(config.rope_scaling)[1]
            cos, sin = angles.cos() * magnitude, angles.sin() * magnitude
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):  # as HF DeepseekV3: N(0, initializer_range) for every matrix, norms = 1
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, (Gate, Experts)):
            for p in module.parameters(recurse=False):
                nn.init.normal_(p, std=std)

    def moe_layers(self):
        return [b.mlp for b in self.layers if isinstance(b.mlp, MoE)]

    def blocks(self):
        """The transformer blocks: the units FSDP2 shards."""
        return list(self.layers)

    def attention_layers(self):
        """The layers QK-Clip rescales (`qk_clip_`: the softmax-attention ones, not KDA), in the order of forward's
        max logits."""
        return [b.self_attn for b in self.layers if hasattr(b.self_attn, "qk_clip_")]

    def forward(self, idx, targets=None, cache=None, start_pos=0, record_max_logits=False):
        """idx: [B, T] token ids -> (logits [B, T, vocab], loss or None). With `cache`, runs absorbed MLA over the
        cached latents, the new tokens sitting at positions start_pos..start_pos+T-1 (start_pos an int, or a
        LongTensor [B] of each row's own start: every row then continues its cache). The loss adds the MoE balance
        loss in training mode only. With record_max_logits (for QK-Clip), returns a third value: every layer's
        per-head max attention logit [softmax-attention layers, heads]."""
        T = idx.shape[1]
        if cache_end(start_pos, T) > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {cache_end(start_pos, T)} tokens exceeds max_position_embeddings "
                f"({self.config.max_position_embeddings})"
            )
        cos = sin = None
        if self.rope_cos is not None:
            positions = token_positions(start_pos, T, idx.device)  # [T], or [B, T]
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [T, d_rope / 2] or [B, T, d_rope / 2]
            if positions.dim() == 2:  # per row: [B, 1, T, d_rope / 2], broadcast over heads
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        x = F.dropout(self.embed_tokens(idx), self.config.dropout, self.training)
        aux_losses, max_logits = [], []
        for i, layer in enumerate(self.layers):
            x, aux_loss, max_logit = layer(
                x, cos, sin, None if cache is None else cache[i], start_pos, record_max_logits
            )
            aux_losses += [] if aux_loss is None else [aux_loss]
            max_logits += [] if max_logit is None else [max_logit]  # KDA layers have none
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
            loss = loss + sum(aux_losses) if aux_losses else loss
        if not record_max_logits:
            return logits, loss
        return logits, loss, torch.stack(max_logits) if max_logits else logits.new_empty(0, 0)

    @torch.no_grad()
    def update_expert_bias(self, gamma=1e-3):
        """Aux-loss-free balancing, once per optimizer step. Sums token counts over ranks first when distributed.
        Returns per-layer load statistics for logging."""
        layers = self.moe_layers()
        if layers and torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = torch.stack([m.tokens_per_expert for m in layers])
            torch.distributed.all_reduce(counts)
            for m, c in zip(layers, counts):
                m.tokens_per_expert.copy_(c)
        return [m.update_bias(gamma) for m in layers]

    def num_params(self):
        """Total parameters and parameters active per token (K of E routed experts, plus everything else)."""
        total = sum(p.numel() for p in self.parameters())
        c = self.config
        inactive = sum(p.numel() for m in self.moe_layers() for p in m.experts.parameters())
        inactive = inactive * (c.n_routed_experts - c.num_experts_per_tok) // c.n_routed_experts
        return {"total": total, "active": total - inactive, "embedding": self.embed_tokens.weight.numel()}

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 x active parameters that do matmuls (the embedding is a lookup; the untied
        lm_head counts) + attention's QK^T and PV over the context (nanoGPT's MFU estimate)."""
        c, params = self.config, self.num_params()
        kinds = [c.layer_type(i) for i in range(c.num_hidden_layers)]
        attn = kinds.count("full_attention") * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * seq_len
        # KDA per token and head: the chunk's decayed q.k and k.k scores, their products with values (~ 4 C d), and
        # reading, correcting and updating the d x d state (~ 4 d^2); grows with the chunk, not with seq_len
        kda = (
            kinds.count("linear_attention")
            * c.linear_num_heads
            * (4 * CHUNK * c.linear_head_dim + 4 * c.linear_head_dim**2)
            // 2
        )
        return 6 * (params["active"] - params["embedding"]) + 6 * (attn + kda)

    @property
    def context_length(self):
        return self.config.context_length

    def make_cache(self, batch_size, max_len):
        """One cache per layer: MLA's latents grow with max_len, KDA's state does not."""
        p = self.lm_head.weight
        return [
            attention_kind(self.config, i).cache(self.config, batch_size, max_len, p.device, p.dtype)
            for i in range(len(self.layers))
        ]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True, generator=None):
        """Sample max_new_tokens after idx [B, T]; returns [B, T + max_new_tokens]."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator))
        return torch.cat([idx] + new, dim=1)

    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True, generator=None):
        """Yield each new token [B, 1] as soon as it is sampled. With use_cache, prefill once and then decode one
        token at a time over the MLA cache; without it, recompute the whole (cropped) context each step."""
        return generate_tokens(
            self,
            idx,
            max_new_tokens,
            self.config.max_position_embeddings,
            temperature,
            top_k,
            top_p,
            generator,
            make_cache=self.make_cache if use_cache else None,
        )


# ---- the MLA -> MHA ablation (config attention="mha"): not part of Kimi-K2, kept apart from it ----


class MHA(Attention):
    """The MLA -> MHA ablation (config attention="mha"), not part of Kimi-K2: full-rank q, k, v projections with
    MLA's head dims and a rope slice in every head's key; its cache holds every head's key and value."""

    def __init__(self, config):
        super().__init__(config)
        c = config
        self.q_proj = nn.Linear(c.hidden_size, self.nh * c.qk_head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.nh * c.qk_head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.nh * self.d_v, bias=False)
        self.o_proj = nn.Linear(self.nh * self.d_v, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache=None, start_pos=0, record_max_logit=False):
        B, T, _ = x.shape
        q, k = (proj(x).view(B, T, self.nh, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj))
        if cos is not None:
            q, k = (torch.cat([t[..., : self.d_nope], apply_rope(t[..., self.d_nope :], cos, sin)], -1) for t in (q, k))
        v = self.v_proj(x).view(B, T, self.nh, -1).transpose(1, 2)  # [B, nh, T, d_v]
        if cache is not None:
            write_cache(cache.k.transpose(1, 2), start_pos, k.transpose(1, 2))  # positions second, as MLA's
            write_cache(cache.v.transpose(1, 2), start_pos, v.transpose(1, 2))
            if continues_cache(start_pos):  # decoding: attend over every cached key and value
                end = cache_end(start_pos, T)
                y = F.scaled_dot_product_attention(
                    q,
                    cache.k[:B, :, :end],
                    cache.v[:B, :, :end],
                    attn_mask=decode_mask(start_pos, T, end, x.device),
                    scale=self.scale,
                )
                return self.o_proj(y.transpose(1, 2).flatten(2)), None
        return self.causal_attention(q, k, v, record_max_logit)

    @torch.no_grad()
    def qk_clip_(self, gamma):
        """QK-Clip for the ablation: every head owns its rope key, so all its q and k rows scale by sqrt(gamma)."""
        for proj in (self.q_proj, self.k_proj):
            self.scale_heads_(proj.weight, self.nh, gamma.sqrt())


class KVCache:
    """The MHA ablation's cache: per-head keys and values, nh * (qk_head_dim + v_head_dim) numbers per token."""

    ROWS = ("k", "v")

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.num_attention_heads, max_len)
        self.k = torch.zeros(*shape, config.qk_head_dim, device=device, dtype=dtype)
        self.v = torch.zeros(*shape, config.v_head_dim, device=device, dtype=dtype)


# config.attention -> its attention layer and inference cache
ATTENTION = {"mla": AttentionKind(MLA, MLACache), "mha": AttentionKind(MHA, KVCache)}


# ---- the config's rules ----


def check_config(config):
    """A ValueError naming the field, for a KimiConfig no model can be built from (loaders make it one line)."""
    positive = [
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "v_head_dim",
        "intermediate_size",
        "moe_intermediate_size",
        "n_routed_experts",
        "num_experts_per_tok",
        "n_group",
        "topk_group",
        "max_position_embeddings",
    ]
    for name in positive:
        if not isinstance(getattr(config, name), int) or getattr(config, name) <= 0:
            raise ValueError(f"{name} must be a positive integer, got {getattr(config, name)!r}")
    if config.q_lora_rank is not None and config.q_lora_rank <= 0:
        raise ValueError(f"q_lora_rank must be positive or None, got {config.q_lora_rank}")
    if config.qk_rope_head_dim <= 0 or config.qk_rope_head_dim % 2:
        raise ValueError(f"qk_rope_head_dim must be a positive even number, got {config.qk_rope_head_dim}")
    if config.num_experts_per_tok > config.n_routed_experts:
        raise ValueError(
            f"num_experts_per_tok ({config.num_experts_per_tok}) cannot exceed n_routed_experts "
            f"({config.n_routed_experts})"
        )
    if config.n_routed_experts % config.n_group:
        raise ValueError(
            f"n_routed_experts ({config.n_routed_experts}) must be divisible by n_group ({config.n_group})"
        )
    if config.topk_group > config.n_group:
        raise ValueError(f"topk_group ({config.topk_group}) cannot exceed n_group ({config.n_group})")
    group_size = config.n_routed_experts // config.n_group
    if config.n_group > 1 and config.topk_group * group_size < config.num_experts_per_tok:
        raise ValueError("topk_group groups hold fewer experts than num_experts_per_tok: raise topk_group")
    if not 0 <= config.first_k_dense_replace <= config.num_hidden_layers:
        raise ValueError(f"first_k_dense_replace must be in [0, num_hidden_layers], got {config.first_k_dense_replace}")
    if config.n_shared_experts < 0:
        raise ValueError(f"n_shared_experts must be >= 0, got {config.n_shared_experts}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {config.dropout}")
    if config.attention not in ATTENTION:
        raise ValueError(f"attention must be {' or '.join(map(repr, ATTENTION))}, got {config.attention!r}")
    for name in ("rms_norm_eps", "rope_theta", "initializer_range", "routed_scaling_factor"):
        if not isinstance(getattr(config, name), (int, float)) or not getattr(config, name) > 0:
            raise ValueError(f"{name} must be a positive number, got {getattr(config, name)!r}")
    if not config.aux_loss_alpha >= 0:
        raise ValueError(f"aux_loss_alpha must be >= 0, got {config.aux_loss_alpha}")
    if config.layer_types is not None:
        kinds = config.layer_types
        if not (isinstance(kinds, list) and len(kinds) == config.num_hidden_layers and set(kinds) <= set(LAYER_TYPES)):
            raise ValueError(
                f"layer_types must list {config.num_hidden_layers} entries (num_hidden_layers), each "
                f"{' or '.join(map(repr, LAYER_TYPES))}, got {kinds!r}"
            )
    for name in ("linear_num_heads", "linear_head_dim", "linear_conv_kernel_dim"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) <= 0:
            raise ValueError(f"{name} must be a positive integer, got {getattr(config, name)!r}")
    rs = config.rope_scaling
    if rs is not None:
        yarn = '{"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, ...}'
        if not isinstance(rs, dict) or rs.get("type", rs.get("rope_type")) != "yarn":
            raise ValueError(f"rope_scaling supports only YaRN ({yarn}), got {rs!r}")
        if (
            not isinstance(rs.get("factor"), (int, float))
            or rs["factor"] < 1
            or not isinstance(rs.get("original_max_position_embeddings"), int)
            or rs["original_max_position_embeddings"] <= 0
        ):
            raise ValueError(
                f"YaRN rope_scaling needs factor >= 1 and original_max_position_embeddings > 0 (e.g. {yarn}), got {rs}"
            )
