"""Kimi Delta Attention (KDA), the linear-attention layer of Kimi Linear (arXiv 2510.26692), in plain PyTorch.

A gated delta rule with a forget gate per channel: each head keeps a state S [d_k, d_v] that every token first decays
channel by channel, then corrects towards its value (a delta-rule step of strength beta), and reads with its query:

    S_t = (I - beta_t k_t k_t^T) Diag(a_t) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t,   a_t = exp(g_t) in (0, 1]^d_k

so prefill costs O(T) and decoding keeps a state of fixed size, whatever the context. Training and prefill run the
chunkwise-parallel form (chunks of 64: the WY/UT representation, one triangular solve per chunk); decoding runs the
recurrent form. Names follow transformers' `KimiLinearDeltaAttention` (hf_kimi_linear.py maps the checkpoints'
spelling).
Shapes: B batch, T tokens, nh heads, d head dim (d_k = d_v = d), C chunk.

It sits beside model.py's MLA (config.layer_types) and imports nothing from it."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

CHUNK = 64  # positions per chunk of the parallel form (as fla's chunk_kda)
SUB_CHUNK = 8  # positions whose decays are compared one by one inside a chunk (see decayed_scores); 8 = sqrt(64)
# balances the two parts' elementwise work
SPAN = 64 * CHUNK  # tokens whose chunk-local tensors exist at once: a long prefill runs span by span, in bounded memory


def l2_normalize(x, eps=1e-6):
    """x / sqrt(sum x^2 + eps): fla's (and transformers') l2norm, which adds eps where F.normalize clamps."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def decayed_scores(a, b, log_decay):
    """out[i, j] = sum_c a[i, c] b[j, c] exp(G[i, c] - G[j, c]) for j <= i, 0 above; b, G [..., C, d] with G the
    within-chunk cumulative log decay (non-increasing in i), a [n_a, ..., C, d] (several queries, one pass over the
    decays) -> [n_a, ..., C, C].

    exp(G_i - G_j) <= 1 for j <= i, but exp(G_i) and exp(-G_j) apart overflow fp32 once a chunk decays past e^-88,
    so no single matmul of the two. Across sub-chunks both factors are taken relative to G at the first position of
    i's sub-chunk (each factor <= 1, one matmul); within a sub-chunk the C x SUB_CHUNK pairs are compared channel
    by channel."""
    *_, C, d = a.shape
    s = math.gcd(SUB_CHUNK, C)
    n = C // s
    G = log_decay
    a_sub, b_sub, G_sub = (t.unflatten(-2, (n, s)) for t in (a, b, G))  # [..., n, s, d]
    ref = G_sub[..., :1, :]  # [..., n, 1, d]: G at each sub-chunk's first position
    starts = torch.arange(n, device=a.device) * s
    earlier = torch.arange(C, device=a.device) < starts[:, None]  # [n, C]: j lies before sub-chunk n
    b_rel = b.unsqueeze(-3) * (ref - G.unsqueeze(-3)).masked_fill(~earlier[:, :, None], -math.inf).exp()
    across = (a_sub * (G_sub - ref).exp()) @ b_rel.transpose(-1, -2)  # [..., n, s, C]: j in earlier sub-chunks
    above = torch.ones(s, s, dtype=torch.bool, device=a.device).triu(1)  # [s, s]: j past i
    pair_decay = (G_sub.unsqueeze(-2) - G_sub.unsqueeze(-3)).masked_fill(above[:, :, None], -math.inf).exp()
    within = (a_sub.unsqueeze(-2) * b_sub.unsqueeze(-3) * pair_decay).sum(-1)  # [..., n, s, s]
    same = torch.eye(n, dtype=a.dtype, device=a.device)[:, None, :, None]  # [n, 1, n, 1]: row block = column block
    scores = across.unflatten(-1, (n, s)) + within.unsqueeze(-2) * same  # [..., n, s, n, s]
    return scores.flatten(-4, -3).flatten(-2, -1)


def chunk_delta_rule(q, k, v, g, beta, state=None, chunk_size=CHUNK):
    """The chunkwise-parallel gated delta rule. q, k [B, nh, T, d_k] (q already scaled), v [B, nh, T, d_v], g
    [B, nh, T, d_k] log decays (<= 0), beta [B, nh, T]; state [B, nh, d_k, d_v] or None (zeros) -> (o [B, nh, T,
    d_v], final state). Everything in the dtype given (fp32 for training)."""
    B, nh, T, d_k = k.shape
    if T > SPAN:  # span by span, the state carried: the same result, the chunk-local tensors of one span at a time
        out = []
        for start in range(0, T, SPAN):
            o, state = chunk_delta_rule(*(t[:, :, start : start + SPAN] for t in (q, k, v, g, beta)), state, chunk_size)
            out.append(o)
        return torch.cat(out, dim=2), state
    pad = -T % chunk_size  # padded positions: k = v = 0 and g = 0 leave outputs and state untouched
    q, k, v, g = (F.pad(t, (0, 0, 0, pad)).unflatten(2, (-1, chunk_size)) for t in (q, k, v, g))  # [B,nh,N,C,d]
    beta = F.pad(beta, (0, pad)).unflatten(2, (-1, chunk_size)).unsqueeze(-1)  # [B, nh, N, C, 1]
    G = g.cumsum(-2)  # log decay from the chunk's start through each position
    # WY form: within a chunk the states are S_i = Diag(e^G_i) S_0 + sum_{j<=i} Diag(e^(G_i - G_j)) k_j u_j^T for
    # pseudo-values u that solve the delta rule, (I + A) u = beta (v - (e^G k) S_0), A_ij = beta_i k_i.k_j decayed
    # (j < i). Solving once per chunk for both right-hand sides: u = U - W S_0 (the UT transform).
    keys, scores = decayed_scores(torch.stack([k, q]), k, G)  # k_i.k_j and q_i.k_j decayed, j <= i [B,nh,N,C,C]
    A = beta * keys.tril(-1)  # strictly lower
    rhs = torch.cat([beta * G.exp() * k, beta * v], dim=-1)
    W, U = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True).split([d_k, v.shape[-1]], -1)
    q_decayed = q * G.exp()  # reads S_0 through the decay since the chunk's start
    k_to_end = k * (G[..., -1:, :] - G).exp()  # each key decayed to the chunk's end
    S = k.new_zeros(B, nh, d_k, v.shape[-1]) if state is None else state.to(k.dtype)
    out = []
    for c in range(q.shape[2]):  # chunks in order: only the [d_k, d_v] state passes between them
        u = U[:, :, c] - W[:, :, c] @ S  # [B, nh, C, d_v]
        out.append(q_decayed[:, :, c] @ S + scores[:, :, c] @ u)
        S = G[:, :, c, -1].exp().unsqueeze(-1) * S + k_to_end[:, :, c].transpose(-1, -2) @ u
    return torch.stack(out, dim=2).flatten(2, 3)[:, :, :T], S


def recurrent_delta_rule(q, k, v, g, beta, state=None):
    """The same rule one token at a time (decoding): shapes as chunk_delta_rule's."""
    B, nh, T, d_k = k.shape
    S = k.new_zeros(B, nh, d_k, v.shape[-1]) if state is None else state.to(k.dtype)
    out = []
    for t in range(T):
        S = S * g[:, :, t].exp().unsqueeze(-1)  # forget, channel by channel
        read = torch.einsum("bhk,bhkv->bhv", k[:, :, t], S)  # what the state recalls for this key
        update = beta[:, :, t, None] * (v[:, :, t] - read)  # delta rule: move the recall towards v
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, :, t], update)
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(out, dim=2), S


class ForgetGate(nn.Module):
    """KDA's channel-wise forget gate in log space: g = -exp(A_log) * softplus(f_b(f_a(x)) + dt_bias), one decay per
    channel of every head (Gated DeltaNet has one per head), through a rank-d bottleneck."""

    def __init__(self, hidden_size, num_heads, head_dim):
        super().__init__()
        self.head_dim = head_dim
        self.f_a_proj = nn.Linear(hidden_size, head_dim, bias=False)
        self.f_b_proj = nn.Linear(head_dim, num_heads * head_dim, bias=False)
        self.A_log = nn.Parameter(torch.empty(num_heads))  # per-head decay rate, log; HF stores it [1, 1, nh, 1]
        self.dt_bias = nn.Parameter(torch.empty(num_heads * head_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):  # as fla and transformers: rate ~ U(1, 16), softplus(dt_bias) ~ logU(1e-3, 1e-1)
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        dt = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp().clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, x):  # x [B, T, H] -> g [B, T, nh, d] (fp32, <= 0)
        raw = self.f_b_proj(self.f_a_proj(x)).float() + self.dt_bias.float()
        rate = self.A_log.float().exp().repeat_interleave(self.head_dim)
        return (-rate * F.softplus(raw)).unflatten(-1, (-1, self.head_dim))


class GatedRMSNorm(nn.Module):
    """o_norm: RMSNorm over each head's output times sigmoid(gate), in fp32 (KDA's output gate)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, gate):
        y = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return (y * gate.float().sigmoid()).type_as(x)


class KDA(nn.Module):
    """Kimi Delta Attention: q/k/v projections through a short causal depthwise convolution (SiLU), L2-normalised q
    and k, the channel-wise forget gate, a sigmoid beta per head, the gated delta rule, and an output gate through
    a gated RMSNorm. Same call as MLA: forward(x, cos, sin, cache, start_pos, record_max_logit) -> (y, None); it
    uses no rotary position (its state and convolution carry order) and has no attention logits to clip (q and k
    are unit vectors: every q.k lies in [-1, 1])."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.nh, self.d = c.linear_num_heads, c.linear_head_dim
        width = self.nh * self.d
        self.kernel = c.linear_conv_kernel_dim
        self.dropout = c.dropout
        self.q_proj = nn.Linear(c.hidden_size, width, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, width, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, width, bias=False)
        # one depthwise filter per channel of [q | k | v], causal: each position sees its kernel - 1 predecessors
        self.conv1d = nn.Conv1d(3 * width, 3 * width, self.kernel, groups=3 * width, bias=False)
        self.forget_gate = ForgetGate(c.hidden_size, self.nh, self.d)
        self.b_proj = nn.Linear(c.hidden_size, self.nh, bias=False)
        self.g_a_proj = nn.Linear(c.hidden_size, self.d, bias=False)
        self.g_b_proj = nn.Linear(self.d, width, bias=False)
        self.o_norm = GatedRMSNorm(self.d, c.rms_norm_eps)
        self.o_proj = nn.Linear(width, c.hidden_size, bias=False)

    def forward(self, x, cos=None, sin=None, cache=None, start_pos=0, record_max_logit=False):
        B, T, _ = x.shape
        mixed = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1).transpose(1, 2)  # [B, 3w, T]
        # decoding (start_pos > 0, or per-row starts: model.continues_cache): continue the cached conv tail and state
        carried = cache is not None and (isinstance(start_pos, torch.Tensor) or start_pos > 0)
        tail = cache.conv[:B] if carried else mixed.new_zeros(B, mixed.shape[1], self.kernel - 1)
        window = torch.cat([tail.to(mixed.dtype), mixed], dim=-1)  # [B, 3w, kernel - 1 + T]
        if cache is not None:
            cache.conv[:B] = window[..., window.shape[-1] - (self.kernel - 1) :]
        mixed = F.silu(F.conv1d(window, self.conv1d.weight.to(window.dtype), groups=mixed.shape[1]))
        q, k, v = (t.view(B, T, self.nh, self.d).transpose(1, 2).float() for t in mixed.transpose(1, 2).chunk(3, -1))
        q, k = l2_normalize(q) * self.d**-0.5, l2_normalize(k)  # [B, nh, T, d], fp32 as the state
        g = self.forget_gate(x).transpose(1, 2)  # [B, nh, T, d]
        beta = self.b_proj(x).float().sigmoid().transpose(1, 2)  # [B, nh, T]
        state = cache.state[:B] if carried else None
        rule = recurrent_delta_rule if carried and T == 1 else chunk_delta_rule
        with torch.autocast(x.device.type, enabled=False):  # the state, scores and solve in fp32 under bf16 autocast
            o, state = rule(q, k, v, g, beta, state)
        if cache is not None:
            cache.state[:B] = state
        gate = self.g_b_proj(self.g_a_proj(x)).view(B, T, self.nh, self.d)
        y = self.o_norm(o.transpose(1, 2).to(x.dtype), gate).flatten(2)  # [B, T, nh * d]
        return F.dropout(self.o_proj(y), self.dropout, self.training), None


class KDACache:
    """A KDA layer's decoding state, the same size at any context length: the delta-rule state [B, nh, d, d] (fp32)
    and the last kernel - 1 inputs of the short convolution. `max_len` is taken for the caches' common signature."""

    ROWS = ("state", "conv")

    def __init__(self, config, batch_size, max_len, device, dtype):
        nh, d = config.linear_num_heads, config.linear_head_dim
        self.state = torch.zeros(batch_size, nh, d, d, device=device, dtype=torch.float32)
        self.conv = torch.zeros(batch_size, 3 * nh * d, config.linear_conv_kernel_dim - 1, device=device, dtype=dtype)
