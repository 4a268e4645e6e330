"""Kimi Delta Attention (KDA), the linear-attention layer of Kimi Linear (arXiv 2510.26692), in plain PyTorch.

A gated delta rule with a forget gate per channel: each head keeps a state S [d_k, d_v] that every token first decays
channel by channel, then corrects towards its value (a delta-rule step of strength beta), and reads with its query:

    S_t = (I - beta_t k_t k_t^T) Diag(a_t) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t,   a_t = exp(g_t) in (0, 1]^d_k

so prefill costs O(T) and decoding keeps a state of fixed size, whatever the context. Training and prefill run the
chunkwise-parallel form (chunks of 16: the WY/UT representation, one unit-triangular inverse per chunk); decoding
runs the recurrent form. Names follow transformers' `KimiLinearDeltaAttention` (hf_kimi_linear.py maps the
checkpoints' spelling).
Shapes: B batch, T tokens, nh heads, d head dim (d_k = d_v = d), C chunk.

It sits beside model.py's MLA (config.layer_types) and imports nothing from it."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

CHUNK = 16  # positions per chunk of the parallel form; measured fastest of 8..64 (docs/benchmarks.md, KDA speed),
# from 64-token training windows to 4k-token prefills: the chunk-local work grows with the chunk, the sequential part
# (one d x d product per chunk) is small
SUB_CHUNK = 4  # positions whose decays are compared one by one inside a chunk (see decay_factors); sqrt(CHUNK)
# balances the two parts' elementwise work
RECURRENT_UP_TO = 8  # a step of this many tokens or fewer (decoding) runs the recurrent form: the chunked form pads
# to a chunk and costs the same from 1 to 16 tokens, the recurrent one grows with them (equal at ~8 tokens, batch 1)
SPAN_FLOATS = 2**24  # fp32 numbers the chunk-local tensors may hold at once (64 MiB): longer prefills run span by span


def l2_normalize(x, eps=1e-6):
    """x / sqrt(sum x^2 + eps): fla's (and transformers') l2norm, which adds eps where F.normalize clamps."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def floored_exp(x):
    """exp(x) for x <= 0, the exponent floored at -80 (e^-80 ~ 2e-35, still a normal fp32 number): ATen's exp takes a
    ~10x slower path for results that underflow (measured on Zen 4), and terms below e^-80 of unit vectors' products
    change nothing at fp32's resolution. Capped at 0 too: the entries a mask then zeroes (j after i) have x > 0, and
    their exp may overflow to inf, which a zero turns into nan."""
    return x.clamp(-80, 0).exp()


def decay_factors(G):
    """The decays exp(G_i - G_j), j <= i, of a chunk, as factors that never overflow. G [..., C, d] is the
    within-chunk cumulative log decay (non-increasing in i); exp(G_i) and exp(-G_j) apart overflow fp32 once a chunk
    decays past e^-88, so no single matmul of the two. Positions fall in n sub-chunks of s. For j in an earlier
    sub-chunk m than i's sub-chunk n, exp(G_i - G_j) = exp(G_i - first_n) exp(first_n - last_m) exp(last_m - G_j),
    every factor <= 1 (first_n, last_m: G at sub-chunk n's first and m's last position): to_first [..., n, s, d],
    between [..., n, n, d] (0 unless m < n), from_last [..., n, s, d]. Within a sub-chunk the s x s pairs are kept:
    pairs [..., n, s, s, d] = exp(G_i - G_j) for j <= i, else 0."""
    C = G.shape[-2]
    s = math.gcd(SUB_CHUNK, C)
    n = C // s
    G_sub = G.unflatten(-2, (n, s))  # [..., n, s, d]
    first, last = G_sub[..., :1, :], G_sub[..., -1:, :]  # [..., n, 1, d]
    earlier = torch.ones(n, n, dtype=torch.bool, device=G.device).tril(-1)[:, :, None]  # [n, n, 1]: m < n
    between = floored_exp(first - last.transpose(-3, -2)) * earlier  # [..., n, n, d]
    pair_first = torch.ones(s, s, dtype=torch.bool, device=G.device).tril()[:, :, None]  # [s, s, 1]: j <= i
    pairs = floored_exp(G_sub.unsqueeze(-2) - G_sub.unsqueeze(-3)) * pair_first
    return floored_exp(G_sub - first), between, floored_exp(last - G_sub), pairs


def diagonal_blocks(scores, n):
    """The n diagonal s x s blocks of [..., C, C] scores, as a view [..., n, s, s]."""
    return scores.unflatten(-2, (n, -1)).unflatten(-1, (n, -1)).diagonal(dim1=-4, dim2=-2).movedim(-1, -3)


class DecayedScores(torch.autograd.Function):
    """out[i, j] = sum_c a[i, c] b[j, c] exp(G[i, c] - G[j, c]) for j <= i, 0 above: b, G [..., C, d], a [n_a, ...,
    C, d] (several queries, one pass over the decays) -> [n_a, ..., C, C]. By hand both ways: autograd of the
    elementwise products kept more temporaries and took ~3x the forward (the layer's main cost on a CPU); this
    backward reuses the forward's decays and takes two passes like it:
    dA_i = sum_j dO_ij b_j e^(G_i - G_j), dB_j = sum_i dO_ij a_i e^(G_i - G_j), dG = sum(a dA) - b dB."""

    @staticmethod
    def relative(a, b, to_first, between, from_last):
        """a_i exp(G_i - first_n) [n_a, ..., n, s, d] and b_j exp(first_n - G_j) [..., n, m, s, d] (0 unless m < n)."""
        n, s = to_first.shape[-3:-1]
        b_last = b.unflatten(-2, (n, s)) * from_last  # [..., m, s, d]
        return a.unflatten(-2, (n, s)) * to_first, b_last.unsqueeze(-4) * between.unsqueeze(-2)

    @staticmethod
    def forward(ctx, a, b, G):
        factors = decay_factors(G)
        ctx.save_for_backward(a, b, *factors)
        to_first, between, from_last, pairs = factors
        n, s = to_first.shape[-3:-1]
        a_rel, b_rel = DecayedScores.relative(a, b, to_first, between, from_last)
        b_rel = b_rel.flatten(-3, -2).transpose(-1, -2)  # [..., n, d, C]
        # j before i's sub-chunk, one matmul per query (a broadcast one would copy b_rel for each); then j in it, the
        # s x s blocks on the diagonal, added in place
        scores = torch.stack([(query @ b_rel).flatten(-3, -2) for query in a_rel])  # [n_a, ..., C, C]
        b_pairs = b.unflatten(-2, (n, s)).unsqueeze(-3) * pairs  # [..., n, s_i, s_j, d]
        diagonal_blocks(scores, n).add_((a.unflatten(-2, (n, s)).unsqueeze(-2) * b_pairs).sum(-1))
        return scores

    @staticmethod
    def backward(ctx, d_scores):
        a, b, to_first, between, from_last, pairs = ctx.saved_tensors
        n, s = to_first.shape[-3:-1]
        a_sub, b_sub = a.unflatten(-2, (n, s)), b.unflatten(-2, (n, s))
        a_rel, b_rel = DecayedScores.relative(a, b, to_first, between, from_last)
        d_rows = d_scores.unflatten(-2, (n, s))  # [n_a, ..., n, s, C]
        d_within = diagonal_blocks(d_scores, n).unsqueeze(-1)  # [n_a, ..., n, s_i, s_j, 1]
        b_rel = b_rel.flatten(-3, -2)  # [..., n, C, d]
        d_a = torch.stack([d_query @ b_rel for d_query in d_rows]) * to_first  # across
        d_a = d_a + (d_within * (b_sub.unsqueeze(-3) * pairs)).sum(-2)  # within
        d_b_rel = sum(d_query.transpose(-1, -2) @ query for d_query, query in zip(d_rows, a_rel))  # [..., n, C, d]
        d_b_rel = d_b_rel.unflatten(-2, (n, s))  # [..., n, m, s, d]
        d_b = (d_b_rel * between.unsqueeze(-2)).sum(-4) * from_last  # across: [..., m, s, d]
        d_b = d_b + ((d_within * a_sub.unsqueeze(-2)).sum(0) * pairs).sum(-3)  # within
        d_a, d_b = d_a.flatten(-3, -2), d_b.flatten(-3, -2)
        return d_a, d_b, (a * d_a).sum(0) - b * d_b


def unit_lower_solve(A, rhs):
    """(I + A)^-1 rhs for A [..., C, C] strictly lower triangular, by matmuls: A^C = 0, so (I + A)(I - A)(I + A^2)
    (I + A^4)... telescopes to I. torch.linalg.solve_triangular solves the batch one small matrix at a time on a
    CPU (~3x slower here, forward and backward, at 64 heads x 4 chunks of 16)."""
    powers = [A]  # A, A^2, A^4, ... up to the chunk
    while 2 ** len(powers) < A.shape[-1]:
        powers.append(powers[-1] @ powers[-1])
    x = rhs
    for power in reversed(powers[1:]):
        x = x + power @ x
    return x - A @ x


def chunk_span(B, nh, d):
    """Tokens per span of a long prefill: the chunk-local tensors (~ (CHUNK / SUB_CHUNK + 2 SUB_CHUNK) x d numbers
    per head and token, several alive at once) stay within SPAN_FLOATS, whatever the batch and heads."""
    per_token = 4 * B * nh * d * (CHUNK // SUB_CHUNK + 2 * SUB_CHUNK)
    return max(1, SPAN_FLOATS // per_token // CHUNK) * CHUNK


def chunk_delta_rule(q, k, v, g, beta, state=None):
    """The chunkwise-parallel gated delta rule. q, k [B, nh, T, d_k] (q already scaled), v [B, nh, T, d_v], g
    [B, nh, T, d_k] log decays (<= 0), beta [B, nh, T]; state [B, nh, d_k, d_v] or None (zeros) -> (o [B, nh, T,
    d_v], final state). Everything in the dtype given (fp32 for training)."""
    B, nh, T, d_k = k.shape
    d_v = v.shape[-1]
    span = chunk_span(B, nh, d_k)
    if T > span:  # span by span, the state carried: the same result, the chunk-local tensors of one span at a time
        out = []
        for start in range(0, T, span):
            o, state = chunk_delta_rule(*(t[:, :, start : start + span] for t in (q, k, v, g, beta)), state)
            out.append(o)
        return torch.cat(out, dim=2), state
    pad = -T % CHUNK  # padded positions: k = v = 0 and g = 0 leave outputs and state untouched
    q, k, v, g = (F.pad(t, (0, 0, 0, pad)).unflatten(2, (-1, CHUNK)) for t in (q, k, v, g))  # [B,nh,N,C,d]
    beta = F.pad(beta, (0, pad)).unflatten(2, (-1, CHUNK)).unsqueeze(-1)  # [B, nh, N, C, 1]
    G = g.cumsum(-2)  # log decay from the chunk's start through each position
    # WY form: within a chunk the states are S_i = Diag(e^G_i) S_0 + sum_{j<=i} Diag(e^(G_i - G_j)) k_j u_j^T for
    # pseudo-values u that solve the delta rule, (I + A) u = beta (v - (e^G k) S_0), A_ij = beta_i k_i.k_j decayed
    # (j < i). Solving once per chunk for both right-hand sides: u = U - W S_0 (the UT transform).
    keys, scores = DecayedScores.apply(torch.stack([k, q]), k, G)  # k_i.k_j and q_i.k_j decayed, j <= i [B,nh,N,C,C]
    A = beta * keys.tril(-1)  # strictly lower
    decay = floored_exp(G)  # since the chunk's start
    W, U = unit_lower_solve(A, torch.cat([beta * decay * k, beta * v], dim=-1)).split([d_k, d_v], -1)
    # chunk to chunk, S_end = Diag(e^G_end) S_0 + K_end^T u = M S_0 + H with K_end the keys decayed to the chunk's
    # end: M and H for every chunk at once, then only one [d_k, d_k] x [d_k, d_v] product per chunk in order
    k_to_end = (k * floored_exp(G[..., -1:, :] - G)).transpose(-1, -2)  # [B, nh, N, d_k, C]
    M = torch.diag_embed(decay[..., -1, :]) - k_to_end @ W  # [B, nh, N, d_k, d_k]
    H = k_to_end @ U  # [B, nh, N, d_k, d_v]
    S = k.new_zeros(B, nh, d_k, d_v) if state is None else state.to(k.dtype)
    starts = []  # the state each chunk starts from
    for c in range(q.shape[2]):
        starts.append(S)
        S = H[:, :, c] + M[:, :, c] @ S
    S_0 = torch.stack(starts, dim=2)  # [B, nh, N, d_k, d_v]
    o = (q * decay) @ S_0 + scores @ (U - W @ S_0)  # S_0 read through the decay since the chunk's start, plus u
    return o.flatten(2, 3)[:, :, :T], S


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
        qkv = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])  # one matmul for the three
        mixed = F.linear(x, qkv)  # [B, T, 3w]
        # decoding (start_pos > 0, or per-row starts: model.continues_cache): continue the cached conv tail and state
        carried = cache is not None and (isinstance(start_pos, torch.Tensor) or start_pos > 0)
        tail = cache.conv[:B] if carried else mixed.new_zeros(B, self.kernel - 1, mixed.shape[-1])
        window = torch.cat([tail.to(mixed.dtype), mixed], dim=1)  # [B, kernel - 1 + T, 3w]
        if cache is not None:
            cache.conv[:B] = window[:, T:]
        # the causal depthwise convolution as kernel shifted products, channels last: the same sums as nn.Conv1d's
        # (cross-correlation), without its slow depthwise backward on a CPU or a transpose each way
        filters = self.conv1d.weight.to(window.dtype).squeeze(1).t()  # [kernel, 3w]
        mixed = F.silu(sum(window[:, i : i + T] * filters[i] for i in range(self.kernel)))
        q, k, v = (t.view(B, T, self.nh, self.d).transpose(1, 2).float() for t in mixed.chunk(3, -1))
        q, k = l2_normalize(q) * self.d**-0.5, l2_normalize(k)  # [B, nh, T, d], fp32 as the state
        g = self.forget_gate(x).transpose(1, 2)  # [B, nh, T, d]
        beta = self.b_proj(x).float().sigmoid().transpose(1, 2)  # [B, nh, T]
        state = cache.state[:B] if carried else None
        rule = recurrent_delta_rule if T <= RECURRENT_UP_TO else chunk_delta_rule
        with torch.autocast(x.device.type, enabled=False):  # the state, scores and solve in fp32 under bf16 autocast
            o, state = rule(q, k, v, g, beta, state)
        if cache is not None:
            cache.state[:B] = state
        gate = self.g_b_proj(self.g_a_proj(x)).view(B, T, self.nh, self.d)
        y = self.o_norm(o.transpose(1, 2).to(x.dtype), gate).flatten(2)  # [B, T, nh * d]
        return F.dropout(self.o_proj(y), self.dropout, self.training), None


class KDACache:
    """A KDA layer's decoding state, the same size at any context length: the delta-rule state [B, nh, d, d] (fp32)
    and the last kernel - 1 inputs of the short convolution [B, kernel - 1, 3 nh d]. `max_len` is taken for the
    caches' common signature."""

    ROWS = ("state", "conv")

    def __init__(self, config, batch_size, max_len, device, dtype):
        nh, d = config.linear_num_heads, config.linear_head_dim
        self.state = torch.zeros(batch_size, nh, d, d, device=device, dtype=torch.float32)
        self.conv = torch.zeros(batch_size, config.linear_conv_kernel_dim - 1, 3 * nh * d, device=device, dtype=dtype)
