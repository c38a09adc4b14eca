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
`compact(n, keep)` keeps slots n + keep (a tree's accepted path) right after the first n.
Module names follow the HuggingFace checkpoints so weights load by name.

Batch invariance: after the prompt's pass, a position's logits are the same bits whether
the pass holds 1 token (autoregressive decoding), K + 1 (a chain) or a tree of any shape,
so speculative decoding emits exactly autoregressive decoding's tokens in bfloat16 too.
Every op works row by row except two, made invariant: each linear sees at least MIN_ROWS
rows, and `attention` sums each query's keys in an order fixed by their positions alone
(a tree node's ancestors, scattered among its siblings' slots, are read in position
order). The prompt's pass, the same in every mode, takes SDPA's fast kernel instead.

Decoding one token reads every weight once, so its speed is bandwidth over bytes of weights:
each Linear is packed once at load into oneDNN's blocked layout (`Transformer.prepare`), and
a draft's may also be kept as 4-bit integers for its small calls, a quarter of the bytes.
"""
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class SpecdecodeError(Exception):
    """The base of every error specdecode raises on purpose, one subclass per module (ModelError,
    WeightsError, SamplerError, specdecode.SpecError): catch this one. It lives here because
    model.py imports no other file of the project, so every file can import it."""


class ModelError(SpecdecodeError):
    """A folder that does not hold a model this file can run."""


_said = set()


def say_once(msg):
    if msg not in _said:
        _said.add(msg)
        print(f"[specdecode] {msg}", file=sys.stderr)


MIN_ROWS = 4   # measured (Zen 4, Zen 5, Intel family 6 model 207): oneDNN's packed kernels give a row the same
               # bits for any call of 4 or more rows (bf16 and fp32; 1-3 rows take other kernels), and read
               # bf16 weights ~25% faster at 4 rows than at 1-3: fewer rows are padded with zeros
INT4_GROUP = 32        # inputs per scale: Q4_K's sub-block, which the demo GGUFs' 4-bit tensors fit nearly exactly
INT4_MAX_ROWS = 4      # measured on Zen 4 (bench.py's forward table): int4 beats packed bf16 up to 4 tokens


class Linear(nn.Linear):
    """y = x W^T + b, with W prepared once at load for the CPU.

    pack(): F.linear on a CPU bf16/fp32 tensor has oneDNN reorder W into its blocked layout
    on every call, which costs about half the bandwidth; here that reorder is done once (the
    path Inductor's CPU weight freezing takes) and the plain W is dropped. Same arithmetic:
    bf16 results are bit-identical, fp32 ones differ in summation order only.
    quantize_int4(): W is also kept as 4-bit integers w in groups g of INT4_GROUP inputs,
    W ~ s_g * w + m_g (s_g = (max - min) / 15, m_g = min), and calls of at most INT4_MAX_ROWS
    rows read those: a quarter of the bytes. Only for a draft: its output is approximate.
    """
    packed = int4 = None

    def quantize_int4(self):
        if self.in_features % INT4_GROUP:
            return                                       # no whole groups: this one stays in its dtype
        W = self.weight.detach().float()
        g = W.view(W.shape[0], -1, INT4_GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        s = ((hi - lo) / 15).clamp(min=1e-12)
        w = ((g - lo[..., None]) / s[..., None]).round().clamp(0, 15).to(torch.int32).view(W.shape)
        # torch's int4 matmul computes (w - 8) * s + zero, so zero = m + 8 s
        scales_zeros = torch.stack((s, lo + 8 * s), -1).transpose(0, 1).contiguous().to(self.weight.dtype)
        self.int4 = torch._convert_weight_to_int4pack_for_cpu(w, 1), scales_zeros

    def pack(self):
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)   # 1: laid out for one-token calls
        del self.weight

    def forward(self, x):
        shape, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
        rows = len(x)
        if self.int4 is not None and rows <= INT4_MAX_ROWS:
            y = torch._weight_int4pack_mm_for_cpu(x, self.int4[0], INT4_GROUP, self.int4[1])
            y = y if self.bias is None else y + self.bias
        elif self.packed is not None:
            if rows < MIN_ROWS:                          # zero rows: no more weight bytes, an invariant kernel
                x = torch.cat((x, x.new_zeros(MIN_ROWS - rows, x.shape[-1])))
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")[:rows]
        else:
            y = F.linear(x, self.weight, self.bias)
        return y.view(*shape, -1)


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

    @property
    def layer_weights(self):
        """Weights a token is multiplied by in the decoder layers (its FLOPs are twice this;
        the embedding is a lookup and the head runs on the last tokens only)."""
        attention = self.dim * (2 * self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        return self.n_layers * (attention + 3 * self.dim * self.hidden_dim)

    @classmethod
    def from_dir(cls, path):
        path = Path(path)
        if not path.is_dir():
            raise ModelError(f"no such folder: {path}")
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json (expected a HuggingFace model folder)")
        try:
            c = json.loads((path / "config.json").read_text())
        except ValueError as e:
            raise ModelError(f"{path / 'config.json'} is not valid JSON: {e}") from None
        if not isinstance(c, dict):
            raise ModelError(f"{path / 'config.json'} is not a JSON object")
        try:
            return cls.read(c, path)
        except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
            raise ModelError(f"{path / 'config.json'} lacks or mis-states a field: {type(e).__name__} {e}") from None

    @classmethod
    def read(cls, c, path):
        arch = (c.get("architectures") or ["(none)"])[0]
        if arch not in ARCHITECTURES:
            raise ModelError(f"unsupported architecture {arch} in {path} (supported: {', '.join(ARCHITECTURES)})")
        scaling = c.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "default"):
            raise ModelError(f"unsupported rope_scaling {scaling} (supported: llama3)")
        n_heads = c["num_attention_heads"]
        config = cls(
            arch=arch, vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=c.get("num_key_value_heads", n_heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // n_heads, hidden_dim=c["intermediate_size"],
            norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=c.get("rope_theta", 10000.0),
            rope_scaling=scaling if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3" else None,
            max_seq_len=c.get("max_position_embeddings", 4096), tie_embeddings=c.get("tie_word_embeddings", False),
            qkv_bias=arch == "Qwen2ForCausalLM",
            qk_norm=arch == "Qwen3ForCausalLM")
        sizes = (config.vocab_size, config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim,
                 config.hidden_dim, config.max_seq_len)
        if not all(isinstance(v, int) and v > 0 for v in sizes) or config.n_heads % config.n_kv_heads:
            raise ModelError(f"{path / 'config.json'}: its sizes do not make a model ({sizes})")
        return config


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
    """Rotate pairs (x_i, x_{i+d/2}) by angle position * theta_i. x: [B, H, T, d]; cos/sin: [B, 1, T, d]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


BLOCK = 64     # keys per partial sum of attention: each query sums its keys block by block, in position order


@dataclass
class Visible:
    """The keys each query of a pass sees (its [T, S] mask), made once per forward: the first
    `shared` slots (whole blocks) are read in place, masked by `bias` [T, shared] (0 or -inf);
    where a query sees slots past those that are no prefix (a tree node's ancestors, among its
    siblings' slots), `tail` (T, L) lists them in order, padded where `valid` is False."""
    shared: int
    bias: torch.Tensor
    tail: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def of(cls, mask, invariant=True):
        """invariant False: every key in place (a draft's passes need not be batch-invariant)."""
        T, S = mask.shape
        seen = mask.sum(1, keepdim=True)
        if not invariant or bool((mask == (torch.arange(S, device=mask.device) < seen)).all()):   # prefixes: in place
            shared, rest = -(-S // BLOCK) * BLOCK, mask[:, :0]
        else:
            shared = int(mask.all(0).long().cumprod(0).sum()) // BLOCK * BLOCK     # the blocks all queries see
            rest = mask[:, shared:]
        n = rest.sum(1, keepdim=True)
        L = -(-int(n.max()) // BLOCK) * BLOCK
        order = torch.argsort((~rest).to(torch.uint8), dim=1, stable=True)[:, :L]  # seen slots first, in order
        bias = torch.zeros(T, shared, device=mask.device).masked_fill_(~F.pad(mask, (0, max(0, shared - S)))[:, :shared],
                                                                       float("-inf"))
        return cls(shared, bias, F.pad(order, (0, L - order.shape[1])) + shared,
                   torch.arange(L, device=mask.device) < n)


def attention(q, k, v, seen: Visible):
    """softmax(q k^T / sqrt(hs)) v over the keys each query sees, in float32 at least, summed
    in an order fixed by the keys' positions alone: every block of BLOCK keys is summed on its
    own, and the blocks one after another (padding adds exact zeros). A query then gets the
    same bits in a pass of any width or tree shape as alone (measured: matmuls of 4 rows or
    more give a row the same bits; softmax's and SDPA's sums depend on the row's length).
    q (B, nh, T, hs); k, v (B, nkv, S, hs); the G = nh / nkv query heads of a key/value head
    are stacked as the rows of one matmul, so the cache is read once, not once per head."""
    (B, H, T, d), dtype = q.shape, v.dtype
    BK, G, n, L = B * k.shape[1], H // k.shape[1], seen.shared, seen.tail.shape[1]
    g, f = max(G, MIN_ROWS), torch.promote_types(q.dtype, torch.float32)
    q = F.pad(q.reshape(BK, G, T, d).to(f) * d ** -0.5, (0, 0, 0, 0, 0, g - G))      # (B*nkv, g, T, hs)
    k, v = k.reshape(BK, -1, d).to(f), v.reshape(BK, -1, d).to(f)                  # (B*nkv, S, hs)
    s = (q.reshape(BK, g * T, d) @ k.transpose(1, 2)).view(BK, g, T, -1)           # (B*nkv, g, T, S): every slot
    shared = F.pad(s[..., :n], (0, n - min(n, s.shape[-1])), value=float("-inf")) + seen.bias.to(f)
    if L:                                                     # each query's last keys, in position order
        tail = s[..., n:].gather(-1, (seen.tail - n).expand(BK, g, T, L)).masked_fill(~seen.valid, float("-inf"))
        shared = torch.cat((shared, tail), -1)                                     # (B*nkv, g, T, n + L)
    e = (shared - shared.amax(-1, keepdim=True)).exp()
    l = e.view(BK, g, T, -1, BLOCK).sum(-1).cumsum(-1)[..., -1:]                   # (B*nkv, g, T, 1)
    v_shared = F.pad(v[:, :n], (0, 0, 0, n - min(n, v.shape[1])))
    y = e[..., :n].reshape(BK, g * T, n // BLOCK, BLOCK).transpose(1, 2) @ v_shared.view(BK, -1, BLOCK, d)
    if L:                                                                          # (B*nkv, blocks, g*T, hs)
        v_tail = v.index_select(1, seen.tail.flatten()).view(BK, T, L // BLOCK, BLOCK, d)
        y_tail = e[..., n:].reshape(BK, g, T, L // BLOCK, BLOCK).permute(0, 2, 3, 1, 4) @ v_tail
        y = torch.cat((y, y_tail.permute(0, 2, 3, 1, 4).reshape(BK, L // BLOCK, g * T, d)), 1)
    y = y.sum(1).view(BK, g, T, d)                        # (a sum over blocks, not the inner dim, runs in order)
    return (y[:, :G] / l[:, :G]).to(dtype).reshape(B, H, T, d)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class KVCache:
    """Keys and values of max_len slots for one layer, (B, nkv, max_len, hs) each."""

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
        """seen None: the prompt's pass (causal, from slot 0), else the keys each query sees."""
        B, T, _ = x.shape
        c = self.c
        q, k, v = self.qkv_proj(x).view(B, T, -1, c.head_dim).split((c.n_heads, c.n_kv_heads, c.n_kv_heads), dim=2)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)   # (B, nh|nkv, T, hs)
        k, v = cache.update(start, k, v.transpose(1, 2))                                        # (B, nkv, start+T, hs)
        if seen is None:                             # the prompt: SDPA's flash kernel, fast for many queries
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = attention(q, k, v, seen)                                                          # (B, nh, T, hs)
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


FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fuse(state):
    """HuggingFace checkpoints keep q, k, v (and gate, up) as separate matrices with the same
    input; stacked into one, a layer makes 4 matmul calls instead of 7, over the same bytes
    (each call has a fixed cost: about 0.1 ms on a 2-core CPU)."""
    for key in list(state):
        for fused, parts in FUSED.items():
            if f".{parts[0]}." in key:
                pieces = [state.pop(key.replace(parts[0], p), None) for p in parts]
                if all(p is not None for p in pieces):
                    state[key.replace(parts[0], fused)] = torch.cat(pieces)


class Transformer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        self.model = Decoder(c)
        self.lm_head = Linear(c.dim, c.vocab_size, bias=False)
        self.length = 0          # cache slots in use
        self.batch_invariant = True   # False: tree passes read keys in place, faster, their sums in another order

    @classmethod
    def from_dir(cls, path, config: Config, device="cpu", dtype=torch.bfloat16, int4=False):
        """Build on the meta device, take the (memory-mapped) safetensors weights, cast once,
        then prepare the linears (`prepare`)."""
        from safetensors import SafetensorError, safe_open
        path = Path(path)
        index = path / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
        state = {}
        try:
            for f in files:
                with safe_open(str(path / f), framework="pt") as st:
                    for name in st.keys():
                        state[name] = st.get_tensor(name).to(device=device, dtype=dtype)
        except (OSError, SafetensorError, ValueError) as e:
            raise ModelError(f"cannot read weights in {path}: {e}") from None
        if config.tie_embeddings or "lm_head.weight" not in state:
            state["lm_head.weight"] = state.get("model.embed_tokens.weight")
        fuse(state)
        with torch.device("meta"):
            model = cls(config)
        missing = [k for k in model.state_dict() if state.get(k) is None]
        if missing:
            raise ModelError(f"weights in {path} lack {len(missing)} tensors, e.g. {missing[0]}")
        wrong = [(k, v.shape) for k, v in model.state_dict().items() if state[k].shape != v.shape]
        if wrong:
            k, shape = wrong[0]
            raise ModelError(f"weights in {path} do not fit its config.json: {k} is {tuple(state[k].shape)}, "
                             f"the config implies {tuple(shape)}")
        model.load_state_dict({k: state[k] for k in model.state_dict()}, assign=True)
        model.prepare(int4)
        return model.eval()

    def prepare(self, int4=False):
        """Once, at load: pack every linear for the CPU (and keep int4 copies when asked, in bf16).
        Where that cannot be done (CUDA, float16 without AVX512-FP16, float64) the linears
        stay plain F.linear, and the reason is said once."""
        if int4 and self.device.type == "cpu" and self.dtype == torch.bfloat16:
            for m in self.modules():
                if isinstance(m, Linear):
                    m.quantize_int4()
        elif int4:        # measured: torch's float32 int4 kernel is 6x slower than the packed float32 weights
            say_once(f"the int4 draft is for the CPU in bfloat16; on {self.device} in {self.dtype} it keeps its weights")
        if self.device.type != "cpu":
            return say_once(f"linears on {self.device} run as F.linear (nothing to pack)")
        try:
            for m in self.modules():
                if isinstance(m, Linear):
                    m.pack()
        except RuntimeError as e:
            say_once(f"linears run as F.linear, not packed for the CPU: {str(e).splitlines()[0]}")

    @property
    def device(self):
        return self.model.norm.weight.device

    @property
    def dtype(self):
        return self.model.norm.weight.dtype

    def setup_cache(self, max_len, batch_size=1):
        """Preallocate keys and values for max_len slots (and the RoPE tables), empty the cache."""
        c = self.config
        if max_len > c.max_seq_len:
            raise ModelError(f"{max_len} tokens exceed the model's context of {c.max_seq_len}")
        shape = (batch_size, c.n_kv_heads, max_len, c.head_dim)
        self.caches = [KVCache(shape, self.device, self.dtype) for _ in self.model.layers]
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), rope_frequencies(c))
        angles = torch.cat((angles, angles), dim=-1)
        self.rope_cos = angles.cos().to(device=self.device, dtype=self.dtype)
        self.rope_sin = angles.sin().to(device=self.device, dtype=self.dtype)
        self.max_len, self.length = max_len, 0

    @torch.no_grad()
    def forward(self, tokens, positions=None, attn_mask=None, last=None):
        """Logits [B, last or T, V] (float32) for tokens [B, T] appended to the cache: the
        head (V wide) runs on the last `last` tokens only, so a long prompt costs no logits.

        positions [B, T] default to the next slots. attn_mask (bool, True = may attend) is
        [T, T] over the new tokens (each also sees every cached slot) or [T, length + T] over
        all slots (a tree grown level by level hides its other branches); None means causal."""
        B, T = tokens.shape
        start = self.length
        if start + T > self.max_len:
            raise ModelError(f"cache full: {start} + {T} tokens > {self.max_len} slots")
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        seen = None if start == 0 and attn_mask is None else Visible.of(self.full_mask(attn_mask, start, T),
                                                                        self.batch_invariant)
        cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        x = self.model.embed_tokens(tokens)
        for layer, cache in zip(self.model.layers, self.caches):
            x = layer(x, cos, sin, cache, start, seen)
        self.length = start + T
        return self.lm_head(self.model.norm(x[:, -last:] if last else x)).float()   # the head only where it is read

    def full_mask(self, attn_mask, start, T):
        """[T, start + T]: the new tokens' mask (causal by default) after the cached slots."""
        m = torch.ones(T, T, dtype=torch.bool, device=self.device).tril() if attn_mask is None else attn_mask
        return m if m.shape[-1] == start + T else F.pad(m, (start, 0), value=True)

    def truncate(self, n):
        """Forget every cached slot from n on (rejected draft tokens)."""
        self.length = n

    def compact(self, n, keep):
        """Keep slots n + keep[i] (a LongTensor of offsets) as slots n + i: a tree's accepted path."""
        for cache in self.caches:
            cache.keep(n, n + keep)
        self.length = n + len(keep)
