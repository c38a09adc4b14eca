"""A Llama / Qwen2 / Qwen3 decoder written directly in PyTorch, with a KV cache.

    x = embed(tokens)
    for each layer:  x = x + Attention(RMSNorm(x));  x = x + SwiGLU(RMSNorm(x))
    logits = head(RMSNorm(x))

RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w.  Attention is grouped-query attention
(n_kv_heads <= n_heads) with rotary position embeddings (RoPE); Qwen2 adds biases to
q/k/v, Qwen3 RMS-normalises q and k per head. SwiGLU(x) = down(silu(gate(x)) * up(x)).

Each layer has a preallocated `KVCache`. `forward(tokens, positions, attn_mask)` appends
the new tokens' keys and values after the `length` slots already cached; positions (for
RoPE) are given explicitly, so a token tree can put siblings at the same position. The
mask says which new tokens each new token sees (a tree mask); every new token sees the
whole cached prefix unless the mask covers it too. `truncate(n)` rolls the cache back,
`compact(n, slots)` keeps the given slots (a tree's accepted path) right after the first n.
Module names follow the HuggingFace checkpoints so weights load by name.

The linears (Linear, QLinear) and the loading of weights are linears.py's.

Batch invariance (the last section, read later): after the prompt's pass, a position's
logits are the same bits whether the pass holds 1 token (autoregressive decoding), K + 1 (a
chain) or a tree of any shape, so speculative decoding emits exactly autoregressive
decoding's tokens in bfloat16 too. Every op works row by row except two, made invariant:
each dense linear sees at least MIN_ROWS rows (a quantized one is invariant at any rows:
qmatmul.cpp), and attention sums each query's keys in an order fixed by their positions
alone (a tree node's ancestors, scattered among its siblings' slots, are read in position
order): `attention` here in torch, or in one call a layer qmatmul.cpp's `attend`, where it
is built (the CPU). The prompt's pass, the same in every mode, takes SDPA's fast kernel
instead. The keys and values are cached in float32, as attention reads them.
"""
import math
import time
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import linears
from linears import Linear, ModelError, QLinear, TILE


@dataclass
class Config:
    arch: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_seq_len: int
    tie_embeddings: bool
    qkv_bias: bool
    qk_norm: bool

    @classmethod
    def from_dir(cls, path):
        """A HuggingFace folder's config.json (its fields read by linears.read_config), or ModelError."""
        return cls(**linears.read_config(path))


def rope_frequencies(config: Config):
    """theta_i = rope_theta^(-2i/d), with Llama 3's long-context rescaling when configured:
    wavelengths above original_max/low_freq_factor are divided by `factor`, those below
    original_max/high_freq_factor kept, and the band between interpolated smoothly."""
    d = config.head_dim
    freqs = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    s = config.rope_scaling
    if s:
        old = s["original_max_position_embeddings"]
        low, high, factor = s["low_freq_factor"], s["high_freq_factor"], s["factor"]
        wavelen = 2 * math.pi / freqs
        smooth = ((old / wavelen - low) / (high - low)).clamp(0, 1)
        freqs = (1 - smooth) * freqs / factor + smooth * freqs
    return freqs


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+d/2}) by angle position * theta_i:
        (x_i, x_{i+d/2}) -> (x_i cos - x_{i+d/2} sin,  x_{i+d/2} cos + x_i sin).
    x: [B, H, T, d]; cos, sin: [B, 1, T, d], sin's first half negated (`setup_cache`), so the
    rotation is x cos + roll(x, d/2) sin: three ops, not six (one where qmatmul.cpp serves x)."""
    if ext := linears.row_ops(x):
        return ext.rope(x, cos, sin)
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        """x / sqrt(mean(x^2) + eps) in float32, rounded, times w (the same in one call where qmatmul.cpp serves x)."""
        if ext := linears.row_ops(x):
            return ext.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype) * self.weight


class KVCache:
    """Keys and values of max_len slots for one layer, (B, nkv, max_len, hs) each, kept in the
    dtype attention computes in (float32 for a bf16 model: converted once, as written, not at every pass)."""

    def __init__(self, shape, device, dtype):
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, start, k, v):
        """Write k, v (B, nkv, T, hs) at slots start.., return every slot up to them."""
        B, T = k.shape[0], k.shape[2]
        self.k[:B, :, start:start + T], self.v[:B, :, start:start + T] = k, v
        return self.k[:B, :, :start + T], self.v[:B, :, :start + T]

    def keep(self, n, idx):
        """Slots idx (a LongTensor) move to n, n + 1, ...: a tree's accepted path."""
        self.k[:, :, n:n + len(idx)] = self.k[:, :, idx]
        self.v[:, :, n:n + len(idx)] = self.v[:, :, idx]


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.qkv_proj = Linear(c.dim, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, bias=c.qkv_bias)
        self.o_proj = Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        if c.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(c.head_dim, c.norm_eps), RMSNorm(c.head_dim, c.norm_eps)

    def forward(self, x, cos, sin, cache, start, seen):
        """seen None: the prompt's pass (causal, from slot 0); else the keys each query sees, as
        a bool mask [T, S] (qmatmul.cpp's attend) or Visible (`attention`): batch-invariant both."""
        B, T, _ = x.shape
        c = self.c
        qkv = self.qkv_proj(x).view(B, T, -1, c.head_dim).transpose(1, 2)        # (B, nh + 2 nkv, T, hs)
        qk, v = qkv.split((c.n_heads + c.n_kv_heads, c.n_kv_heads), dim=1)
        if c.qk_norm:
            qk = torch.cat((self.q_norm(qk[:, :c.n_heads]), self.k_norm(qk[:, c.n_heads:])), 1)
        q, k = apply_rope(qk, cos, sin).split((c.n_heads, c.n_kv_heads), dim=1)   # (B, nh|nkv, T, hs): one rotation
        k, v = cache.update(start, k, v)                                          # (B, nkv, start+T, hs)
        if seen is None:                             # the prompt: SDPA's flash kernel, fast for many queries
            y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, is_causal=True, enable_gqa=True).to(q.dtype)
        elif isinstance(seen, Visible):
            y = attention(q, k, v, seen)                                          # (B, nh, T, hs)
        else:                                        # a mask [T, S]: qmatmul.cpp's attend, one call (same math)
            y = linears.qmatmul().attend(q, k, v, seen)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.gate_up_proj = Linear(c.dim, 2 * c.hidden_dim, bias=False)
        self.down_proj = Linear(c.hidden_dim, c.dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, cache, start, seen):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start, seen)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)


class Transformer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        self.model = Decoder(c)
        self.lm_head = Linear(c.dim, c.vocab_size, bias=False)
        self.length = 0          # cache slots in use
        self.reduced = None      # restrict_head: (the token ids its head computes, that head)
        self.passes = deque(maxlen=64)   # (start, new tokens, seconds) of the latest forwards: policy.py reads them

    @classmethod
    def from_dir(cls, path, config: Config, device="cpu", dtype=torch.bfloat16, quant="auto"):
        """Built on the meta device, then given the folder's weights (linears.load: dense ones
        cast once and packed for the CPU, quantized blocks run by qmatmul.cpp where it can)."""
        with torch.device("meta"):
            model = cls(config)
        linears.load(model, path, device, dtype, quant)
        return model.eval()

    @property
    def device(self):
        return self.model.norm.weight.device

    @property
    def dtype(self):
        return self.model.norm.weight.dtype

    def setup_cache(self, max_len):
        """Preallocate keys and values for max_len slots (and the RoPE tables), empty the cache."""
        c = self.config
        if max_len > c.max_seq_len:
            raise ModelError(f"{max_len} tokens exceed the model's context of {c.max_seq_len}")
        shape = (1, c.n_kv_heads, max_len, c.head_dim)
        kv = torch.promote_types(self.dtype, torch.float32)                       # as attention reads it
        self.caches = [KVCache(shape, self.device, kv) for _ in self.model.layers]
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), rope_frequencies(c))
        sign = torch.cat((-torch.ones(angles.shape[-1]), torch.ones(angles.shape[-1])))   # for apply_rope's roll
        angles = torch.cat((angles, angles), dim=-1)
        self.rope_cos = angles.cos().to(device=self.device, dtype=self.dtype)
        self.rope_sin = (angles.sin() * sign).to(device=self.device, dtype=self.dtype)
        self.max_len, self.length = max_len, 0

    @torch.no_grad()
    def forward(self, tokens, positions=None, attn_mask=None, last=None):
        """Logits [B, last or T, V] (float32) for tokens [B, T] appended to the cache: the
        head (V wide) runs on the last `last` tokens only, so a long prompt costs no logits.

        positions [B, T] default to the next slots. attn_mask (bool, True = may attend) is
        [T, T] over the new tokens (each also sees every cached slot) or [T, length + T] over
        all slots (a tree grown level by level hides its other branches); None means causal.
        They may lie on any device: they move to the model's."""
        (B, T), start, device, began = tokens.shape, self.length, self.device, time.perf_counter()
        if start + T > self.max_len:
            raise ModelError(f"cache full: {start} + {T} tokens > {self.max_len} slots")
        if positions is None:
            positions = torch.arange(start, start + T).expand(B, T)
        tokens, positions = tokens.to(device), positions.to(device)
        attn_mask = attn_mask if attn_mask is None else attn_mask.to(device)
        if start == 0 and attn_mask is None:
            seen = None                                                  # the prompt: causal
        else:                                                            # where no kernel is built: in torch
            seen = self.full_mask(attn_mask, start, T)
            kernel = device.type == "cpu" and self.dtype != torch.float64 and linears.qmatmul() is not None   # (float32 sums)
            seen = seen if kernel else Visible.of(seen)
        cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        x = self.model.embed_tokens(tokens)
        for layer, cache in zip(self.model.layers, self.caches):
            x = layer(x, cos, sin, cache, start, seen)
        self.length = start + T
        x = self.model.norm(x[:, -last:] if last else x)                 # the head only where it is read
        if self.reduced is None:
            logits = self.lm_head(x).float()
        else:
            rows, head = self.reduced
            logits = x.new_full((*x.shape[:2], self.config.vocab_size), float("-inf"), dtype=torch.float32)
            logits.index_copy_(-1, rows, head(x).float())
        self.passes.append((start, T, time.perf_counter() - began))    # (on a GPU: before it is done)
        return logits

    def restrict_head(self, tokens):
        """Compute the logits of `tokens` (and the rest of their 16-row tiles) only; the others
        come out -inf, so they get probability 0 and are never drawn. A draft's head is a fifth
        of its bytes (Qwen2.5-0.5B: 151,936 x 896); FR-Spec (Zhao et al., "FR-Spec: Accelerating
        Large-Vocabulary Language Models via Frequency-Ranked Speculative Sampling") drafts over
        the most frequent 32K tokens with little loss of acceptance. Blocks heads only (their
        tiles are sliced as they lie); None, or tokens that cover every tile, restores the head."""
        self.reduced = None
        if tokens is None or not isinstance(self.lm_head, QLinear) or len(self.lm_head.parts) > 1:
            return
        tiles = torch.unique(torch.as_tensor(tokens, dtype=torch.long) // TILE)
        if len(tiles) < self.lm_head.out_features // TILE:
            rows = (tiles[:, None] * TILE + torch.arange(TILE)).flatten().to(self.device)
            self.reduced = rows, self.lm_head.tiles(tiles)

    def full_mask(self, attn_mask, start, T):
        """[T, start + T]: the new tokens' mask (causal by default) after the cached slots."""
        m = torch.ones(T, T, dtype=torch.bool, device=self.device).tril() if attn_mask is None else attn_mask
        return m if m.shape[-1] == start + T else F.pad(m, (start, 0), value=True)

    def truncate(self, n):
        """Forget every cached slot from n on (rejected draft tokens)."""
        self.length = n

    def compact(self, n, slots):
        """Keep the first n slots, then `slots` (ascending, from n on) as slots n, n + 1, ...: a
        step's accepted path. What the cache does not hold is dropped (a draft never sees a
        tree's last level, nor, after a step without it, the prefix's last tokens)."""
        if self.length > n:
            slots = [s for s in slots if s < self.length]
            if slots != list(range(n, n + len(slots))):                       # (a path in place moves nothing)
                for cache in self.caches:
                    cache.keep(n, torch.tensor(slots, device=self.device))
            self.length = n + len(slots)


# ---------------------------------------------------------------------------- batch-invariant attention

BLOCK = 64     # keys per partial sum of attention: each query sums its keys block by block, in position order


@dataclass
class Visible:
    """The keys each query of a pass sees (its [T, S] mask), made once per forward: the first
    `prefix` slots (whole blocks) are read in place, masked by `bias` [T, prefix] (0 or -inf);
    where a query sees slots past those that are no prefix (a tree node's ancestors, among its
    siblings' slots), `tail` [T, L] lists them in order, padded where `valid` is False."""
    prefix: int
    bias: torch.Tensor
    tail: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def of(cls, mask):
        T, S = mask.shape
        counts = mask.sum(1, keepdim=True)                                            # keys each query sees
        if bool((mask == (torch.arange(S, device=mask.device) < counts)).all()):    # prefixes: all in place
            prefix, rest = -(-S // BLOCK) * BLOCK, mask[:, :0]
        else:
            prefix = int(mask.all(0).long().cumprod(0).sum()) // BLOCK * BLOCK     # the blocks all queries see
            rest = mask[:, prefix:]
        n = rest.sum(1, keepdim=True)
        L = -(-int(n.max()) // BLOCK) * BLOCK
        order = torch.argsort((~rest).to(torch.uint8), dim=1, stable=True)[:, :L]   # seen slots first, in order
        bias = torch.zeros(T, prefix, device=mask.device).masked_fill_(
            ~F.pad(mask, (0, max(0, prefix - S)))[:, :prefix], float("-inf"))
        return cls(prefix, bias, F.pad(order, (0, L - order.shape[1])) + prefix, torch.arange(L, device=mask.device) < n)


def attention(q, k, v, seen: Visible):
    """softmax(q k^T / sqrt(hs)) v over the keys each query sees, in float32 at least, summed
    in an order fixed by the keys' positions alone: every block of BLOCK keys is summed on its
    own, and the blocks one after another (padding adds exact zeros). A query then gets the
    same bits in a pass of any width or tree shape as alone (measured: matmuls of 4 rows or
    more give a row the same bits; softmax's and SDPA's sums depend on the row's length).
    The G = nh / nkv query heads of a key/value head are stacked as the rows of one matmul
    (padded to MIN_ROWS), so the cache is read once, not once per head. Shapes: M = B * nkv
    matmuls of R = max(G, MIN_ROWS) heads; P prefix slots read in place, L tail slots gathered."""
    (B, H, T, hs), dtype = q.shape, q.dtype
    M, G, P, L = B * k.shape[1], H // k.shape[1], seen.prefix, seen.tail.shape[1]
    R, f32 = max(G, linears.MIN_ROWS), torch.promote_types(q.dtype, torch.float32)
    q = F.pad(q.reshape(M, G, T, hs).to(f32) * hs ** -0.5, (0, 0, 0, 0, 0, R - G))        # (M, R, T, hs)
    k, v = k.reshape(M, -1, hs).to(f32), v.reshape(M, -1, hs).to(f32)                     # (M, S, hs)
    scores = (q.reshape(M, R * T, hs) @ k.transpose(1, 2)).view(M, R, T, -1)              # (M, R, T, S)
    read = F.pad(scores[..., :P], (0, P - min(P, scores.shape[-1])), value=float("-inf")) + seen.bias.to(f32)
    if L:                                                     # each query's last keys, in position order
        tail = scores[..., P:].gather(-1, (seen.tail - P).expand(M, R, T, L)).masked_fill(~seen.valid, float("-inf"))
        read = torch.cat((read, tail), -1)                                                # (M, R, T, P + L)
    e = (read - read.amax(-1, keepdim=True)).exp()
    total = e.view(M, R, T, -1, BLOCK).sum(-1).cumsum(-1)[..., -1:]                       # (M, R, T, 1)
    v_prefix = F.pad(v[:, :P], (0, 0, 0, P - min(P, v.shape[1])))
    y = e[..., :P].reshape(M, R * T, P // BLOCK, BLOCK).transpose(1, 2) @ v_prefix.view(M, -1, BLOCK, hs)
    if L:                                                                                 # (M, blocks, R*T, hs)
        v_tail = v.index_select(1, seen.tail.flatten()).view(M, T, L // BLOCK, BLOCK, hs)
        y_tail = e[..., P:].reshape(M, R, T, L // BLOCK, BLOCK).permute(0, 2, 3, 1, 4) @ v_tail
        y = torch.cat((y, y_tail.permute(0, 2, 3, 1, 4).reshape(M, L // BLOCK, R * T, hs)), 1)
    y = y.sum(1).view(M, R, T, hs)                        # (a sum over blocks, not the inner dim, runs in order)
    return (y[:, :G] / total[:, :G]).to(dtype).reshape(B, H, T, hs)
