"""A Llama / Qwen2 / Qwen3 decoder written directly in PyTorch, with a KV cache.

    x = embed(tokens)
    for each layer:  x = x + Attention(RMSNorm(x));  x = x + SwiGLU(RMSNorm(x))
    logits = head(RMSNorm(x))

RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w.  Attention is grouped-query attention
(n_kv_heads <= n_heads) with rotary position embeddings (RoPE); Qwen2 adds biases to
q/k/v, Qwen3 RMS-normalises q and k per head. SwiGLU(x) = down(silu(gate(x)) * up(x)).

The KV cache is preallocated. `forward(tokens, positions, attn_mask)` appends the new
tokens' keys and values after the `length` slots already cached; positions (for RoPE)
are given explicitly, so a token tree can put siblings at the same position. The
attention mask says which *new* tokens each new token sees (a tree mask); every new
token sees the whole cached prefix unless the mask covers it too. `truncate(n)` rolls the cache back, `compact(n, keep)`
keeps slots n+keep (the accepted path of a tree) right after the first n.
Module names follow the HuggingFace checkpoints so weights load by name.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class ModelError(Exception):
    """A folder that does not hold a model this file can run."""


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
        path = Path(path)
        if not path.is_dir():
            raise ModelError(f"no such folder: {path}")
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json (expected a HuggingFace model folder)")
        try:
            c = json.loads((path / "config.json").read_text())
        except ValueError as e:
            raise ModelError(f"{path / 'config.json'} is not valid JSON: {e}") from None
        arch = (c.get("architectures") or ["(none)"])[0]
        if arch not in ARCHITECTURES:
            raise ModelError(f"unsupported architecture {arch} in {path} (supported: {', '.join(ARCHITECTURES)})")
        scaling = c.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "default"):
            raise ModelError(f"unsupported rope_scaling {scaling} (supported: llama3)")
        n_heads = c["num_attention_heads"]
        return cls(
            arch=arch, vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=c.get("num_key_value_heads", n_heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // n_heads, hidden_dim=c["intermediate_size"],
            norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=c.get("rope_theta", 10000.0),
            rope_scaling=scaling if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3" else None,
            max_seq_len=c.get("max_position_embeddings", 4096), tie_embeddings=c.get("tie_word_embeddings", False),
            qkv_bias=arch == "Qwen2ForCausalLM",
            qk_norm=arch == "Qwen3ForCausalLM")


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


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        if c.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(c.head_dim, c.norm_eps), RMSNorm(c.head_dim, c.norm_eps)
        self.k_cache = self.v_cache = None

    def forward(self, x, cos, sin, start, mask):
        B, T, _ = x.shape
        hd = self.c.head_dim
        q = self.q_proj(x).view(B, T, -1, hd)
        k = self.k_proj(x).view(B, T, -1, hd)
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
        if self.c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        self.k_cache[:B, :, start:start + T] = k
        self.v_cache[:B, :, start:start + T] = v
        k, v = self.k_cache[:B, :, :start + T], self.v_cache[:B, :, :start + T]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, c.hidden_dim, bias=False)
        self.up_proj = nn.Linear(c.dim, c.hidden_dim, bias=False)
        self.down_proj = nn.Linear(c.hidden_dim, c.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, start, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start, mask)
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
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.length = 0          # cache slots in use

    @classmethod
    def from_dir(cls, path, config: Config, device="cpu", dtype=torch.bfloat16):
        """Build on the meta device, then take the (memory-mapped) safetensors weights, cast once."""
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
        with torch.device("meta"):
            model = cls(config)
        missing = [k for k in model.state_dict() if state.get(k) is None]
        if missing:
            raise ModelError(f"weights in {path} lack {len(missing)} tensors, e.g. {missing[0]}")
        model.load_state_dict({k: state[k] for k in model.state_dict()}, assign=True)
        return model.eval()

    @property
    def device(self):
        return self.lm_head.weight.device

    @property
    def dtype(self):
        return self.lm_head.weight.dtype

    def setup_cache(self, max_len, batch_size=1):
        """Preallocate keys and values for max_len slots (and the RoPE tables), empty the cache."""
        c = self.config
        if max_len > c.max_seq_len:
            raise ModelError(f"{max_len} tokens exceed the model's context of {c.max_seq_len}")
        for layer in self.model.layers:
            shape = (batch_size, c.n_kv_heads, max_len, c.head_dim)
            layer.self_attn.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
            layer.self_attn.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), rope_frequencies(c))
        angles = torch.cat((angles, angles), dim=-1)
        self.rope_cos = angles.cos().to(device=self.device, dtype=self.dtype)
        self.rope_sin = angles.sin().to(device=self.device, dtype=self.dtype)
        self.max_len, self.length = max_len, 0

    @torch.no_grad()
    def forward(self, tokens, positions=None, attn_mask=None):
        """Logits [B, T, V] (float32) for tokens [B, T] appended to the cache.

        positions [B, T] default to the next slots. attn_mask (bool, True = may attend) is
        [T, T] over the new tokens (each also sees every cached slot) or [T, length + T] over
        all slots (a tree grown level by level hides its other branches); None means causal."""
        B, T = tokens.shape
        start = self.length
        if start + T > self.max_len:
            raise ModelError(f"cache full: {start} + {T} tokens > {self.max_len} slots")
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        if attn_mask is None:
            attn_mask = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
        mask = attn_mask if attn_mask.shape[-1] == start + T else \
            torch.cat((torch.ones(T, start, dtype=torch.bool, device=tokens.device), attn_mask), dim=1)
        cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x, cos, sin, start, mask)
        self.length = start + T
        return self.lm_head(self.model.norm(x)).float()

    def truncate(self, n):
        """Forget every cached slot from n on (rejected draft tokens)."""
        self.length = n

    def compact(self, n, keep):
        """Keep slots n + keep[i] (a LongTensor of offsets) as slots n + i: a tree's accepted path."""
        idx = n + keep
        for layer in self.model.layers:
            a = layer.self_attn
            a.k_cache[:, :, n:n + len(keep)] = a.k_cache[:, :, idx]
            a.v_cache[:, :, n:n + len(keep)] = a.v_cache[:, :, idx]
        self.length = n + len(keep)
