"""The linears model.py runs, and how a folder's weights reach them.

    Linear    y = x W^T + b, W a dense matrix packed once at load into oneDNN's layout
    QLinear   the same with W kept as a GGUF's quantized blocks, multiplied by qmatmul.cpp
    load      a folder's safetensors -> a Transformer's parameters: blocks placed, q/k/v and
              gate/up fused, dense linears packed

Decoding one token reads every weight once, so its speed is bandwidth over bytes of weights:
packing spares oneDNN a reorder of W at every call, and blocks are a third of bf16's bytes.

Also here, for every file (this one imports none of the project's): the error base class,
the one way to say a line on stderr, and the loader that compiles a kernel on first use
(qmatmul.cpp here, sampler.cu for sampler.py).
"""
import ctypes
import functools
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class SpecdecodeError(Exception):
    """The base of every error specdecode raises on purpose, one subclass per module (ModelError,
    WeightsError, SamplerError, specdecode.SpecError): catch this one."""


class ModelError(SpecdecodeError):
    """A folder that does not hold a model specdecode can run."""


_said = set()


def say(msg, once=False):
    """One line on stderr, "[specdecode] msg" (once: only the first time this process says it)."""
    if not (once and msg in _said):
        _said.add(msg)
        print(f"[specdecode] {msg}", file=sys.stderr, flush=True)


_built = {}


def compiled(source, instead, why_not=None, **flags):
    """The torch extension built from `source` (a file beside this one) by
    torch.utils.cpp_extension.load(**flags): once per process, and once per machine (torch
    caches the build). None where it cannot be (why_not, or the build's own error), said once
    with what runs `instead`."""
    if source not in _built:
        _built[source] = None
        try:
            if why_not:
                raise RuntimeError(why_not)
            from torch.utils.cpp_extension import load
            t = time.perf_counter()
            _built[source] = load(sources=[str(Path(__file__).with_name(source))], verbose=False, **flags)
            if time.perf_counter() - t > 2:
                say(f"compiled {source} ({time.perf_counter() - t:.0f} s, once: torch caches the build)")
        except Exception as e:                       # no compiler, no GPU, a failed build: said, and run without
            say(f"no {source} ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}): {instead}",
                once=True)
    return _built[source]


@functools.cache
def qmatmul():
    """qmatmul.cpp built for this CPU (-march=native differs by CPU, so the build is named by its flags), or None."""
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    return compiled("qmatmul.cpp", "quantized weights run dequantised to dense ones (a C++ compiler makes them "
                    "3x fewer bytes)", name=f"specdecode_qmatmul_{hashlib.sha1(flags.encode()).hexdigest()[:8]}",
                    extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"])

def row_ops(x):
    """qmatmul.cpp where its row-wise ops serve x (bf16 on the CPU, the file built), else None."""
    return qmatmul() if x.is_cpu and x.dtype == torch.bfloat16 else None


MIN_ROWS = 4   # measured (Zen 4, Zen 5, Intel family 6 model 207): oneDNN's packed kernels give a row the same
               # bits for any call of 4 or more rows (bf16 and fp32; 1-3 rows take other kernels), and read
               # bf16 weights ~25% faster at 4 rows than at 1-3: fewer rows are padded with zeros


class Linear(nn.Linear):
    """y = x W^T + b, with W prepared once at load for the CPU.

    pack(): F.linear on a CPU bf16/fp32 tensor has oneDNN reorder W into its blocked layout
    on every call, which costs about half the bandwidth; here that reorder is done once (the
    path Inductor's CPU weight freezing takes) and the plain W is dropped. Same arithmetic:
    bf16 results are bit-identical, fp32 ones differ in summation order only.
    """
    packed = None

    def pack(self):
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)   # 1: laid out for one-token calls
        del self.weight

    def forward(self, x):
        shape, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
        rows = len(x)
        if self.packed is not None:
            if rows < MIN_ROWS:                          # zero rows: no more weight bytes, an invariant kernel
                x = torch.cat((x, x.new_zeros(MIN_ROWS - rows, x.shape[-1])))
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")[:rows]
        else:
            y = F.linear(x, self.weight, self.bias)
        return y.view(*shape, -1)


# ---------------------------------------------------------------------------- quantized blocks 

BLOCK_TENSORS = ("qweight", "scales", "mins", "d", "dmin")
TILE = 16          # outputs a record of qmatmul.cpp holds


def unpack(qweight):
    """4-bit (uint8 [N, K/2]: input 2j in byte j's low nibble, 2j + 1 in its high) -> [N, K]; 8-bit as is."""
    if qweight.dtype == torch.int8:
        return qweight
    return torch.stack((qweight & 15, qweight >> 4), -1).view(len(qweight), -1)


def inputs(qweight):
    """K, the inputs a linear's qweight covers (4-bit: two a byte)."""
    return qweight.shape[1] * (1 if qweight.dtype == torch.int8 else 2)


def dequantize(b):
    """W [N, K] in float32 from blocks b, in the gguf package's order of operations (its exact weights)."""
    q = unpack(b["qweight"]).float()
    K = q.shape[1]
    Gs, Gd = K // b["scales"].shape[1], K // b["d"].shape[1]
    per = lambda d, s: (d.float().repeat_interleave(Gd // Gs, 1) * s.float()).repeat_interleave(Gs, 1)
    W = per(b["d"], b["scales"]) * q
    return W - per(b["dmin"], b["mins"]) if "mins" in b else W


def quantize_4bit(W, group=32):
    """Q4_1's rule for a dense W (lossy): per group of 32 inputs, W ~ d q - dmin with q in 0..15,
    d = (max - min) / 15 and dmin = -min in float16. None where W does not split into tiles and groups."""
    N, K = W.shape
    if N % TILE or K % group:
        return None
    g = W.float().view(N, -1, group)
    lo, hi = g.amin(-1), g.amax(-1)
    d, dmin = ((hi - lo) / 15).clamp(min=2 ** -24).half(), (-lo).half()
    q = ((g + dmin.float()[..., None]) / d.float()[..., None]).round().clamp(0, 15).to(torch.uint8).view(N, K)
    ones = torch.ones(N, K // group, dtype=torch.uint8)
    return dict(qweight=q[:, 0::2] | q[:, 1::2] << 4, scales=ones, mins=ones, d=d, dmin=dmin)


def tile(b, together):
    """Blocks -> qmatmul.cpp's layout: records of 16 outputs x `together` inputs side by side
    (its record_inputs: pairs for bf16, quads for int8), scales (tiles, groups, 16)."""
    q = unpack(b["qweight"])
    N, K = q.shape
    r = q.view(N // TILE, 2, TILE // 2, K // together, together).permute(0, 3, 1, 2, 4)
    r = r.reshape(N // TILE, K // together, 2, TILE // 2 * together)
    records = r[:, :, 0] | r[:, :, 1] << 4 if "mins" in b else r
    by_tile = lambda a: a.view(N // TILE, TILE, -1).transpose(1, 2).contiguous()
    none = lambda dtype: torch.empty(0, dtype=dtype)
    narrow = "mins" in b or bool(q.min() >= -32 and q.max() <= 31)
    return (records.contiguous().view(torch.uint8).view(N // TILE, K // 2, -1), by_tile(b["scales"]),
            by_tile(b["mins"]) if "mins" in b else none(torch.uint8), by_tile(b["d"]),
            by_tile(b["dmin"]) if "mins" in b else none(torch.float16), narrow)


def same_format(parts):
    """Blocks one qmatmul call can take stacked: the same bits and group sizes."""
    K = lambda b: inputs(b["qweight"])
    key = lambda b: (b["qweight"].dtype, K(b) // b["scales"].shape[1], K(b) // b["d"].shape[1])
    return len({key(b) for b in parts}) == 1


class QLinear(nn.Module):
    """y = x W^T + b with W kept as a GGUF's quantized blocks and multiplied by qmatmul.cpp.

    For output n and input k in group g = k // Gs:
        W[n, k] = d[n, k // Gd] * scales[n, g] * q[n, k]  -  dmin[n, k // Gd] * mins[n, g]
    qweight holds q: 4-bit uint8 [N, K/2] (two a byte) or 8-bit int8 [N, K]; scales [N, K/Gs]
    (uint8 for 4-bit, int8 for 8-bit) and mins [N, K/Gs] uint8; d and dmin [N, K/Gd] float16
    (mins and dmin for 4-bit only). Q4_K: Gs 32, Gd 256; Q6_K: 8-bit, Gs 16, Gd 256; Q4_1,
    Q5_0, Q8_0: Gs = Gd = 32, scales and mins 1 (Q4_1's +m is dmin = -m). A fused linear whose
    parts are in different formats (q, k in Q4_K, v in Q6_K) keeps one block set, one call, a part.
    """

    def __init__(self, parts, bias=None):
        super().__init__()
        self.sizes = [len(b["qweight"]) for b in parts]
        self.in_features, self.out_features = inputs(parts[0]["qweight"]), sum(self.sizes)
        self.parts = [tile(b, qmatmul().record_inputs) for b in parts]
        self.biases = bias.float().split(self.sizes) if bias is not None else [None] * len(parts)

    def tiles(self, idx):
        """The linear of outputs idx * TILE .. + TILE - 1 (a LongTensor of tiles), one part."""
        (q, scales, mins, d, dmin, narrow), = self.parts
        out = QLinear.__new__(QLinear)
        nn.Module.__init__(out)
        pick = lambda a: a.index_select(0, idx) if a.numel() else a
        out.parts = [(pick(q), pick(scales), pick(mins), pick(d), pick(dmin), narrow)]
        out.biases = [None if self.biases[0] is None else self.biases[0].view(-1, TILE).index_select(0, idx).flatten()]
        out.sizes, out.in_features, out.out_features = [len(idx) * TILE], self.in_features, len(idx) * TILE
        return out

    def forward(self, x):
        y = [qmatmul().qmatmul(x, *p, b) for p, b in zip(self.parts, self.biases)]   # a row alone, any rows
        return y[0] if len(y) == 1 else torch.cat(y, -1)


# ---------------------------------------------------------------------------- loading

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def read_state(path, device, dtype):
    """The safetensors tensors of a folder: dense ones cast to dtype, and quantized blocks
    ({linear name: {qweight, scales, ...}}, see QLinear) as they are stored."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    index = path / "model.safetensors.index.json"
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise ModelError(f"{index} is not a safetensors index (JSON with a weight_map): {type(e).__name__} {e}") from None
    state, blocks = {}, {}
    try:
        for f in files:
            with safe_open(str(path / f), framework="pt") as st:
                for name in st.keys():
                    module, kind = name.rsplit(".", 1)
                    if kind in BLOCK_TENSORS:
                        blocks.setdefault(module, {})[kind] = st.get_tensor(name).to(device)
                    else:
                        state[name] = st.get_tensor(name).to(device=device, dtype=dtype)
    except (OSError, SafetensorError, ValueError) as e:
        raise ModelError(f"cannot read weights in {path}: {e}") from None
    need = lambda b: {"qweight", "scales", "d"} | ({"mins", "dmin"} if b["qweight"].dtype == torch.uint8 else set())
    bad = [m for m, b in blocks.items() if "qweight" not in b or not (need(b) <= set(b) and len(b["qweight"]) % TILE == 0)]
    if bad:
        raise ModelError(f"quantized weights in {path} lack a tensor (4-bit: qweight, scales, mins, d, dmin; "
                         f"8-bit: qweight, scales, d) or 16-row tiles: {bad[0]}")
    return state, blocks


def place_blocks(state, blocks, config, device, dtype, quant):
    """Decide, at load, which linears run as blocks: with quant "int4" dense and 8-bit linears
    are rounded to 4 bits first, with "draft" (a draft's "auto") its 8-bit blocks only; where
    qmatmul.cpp cannot run them (not the CPU in bf16, no compiler, quant "none") they are
    dequantised into state; the embedding always is (a lookup), and a tied head reads the
    embedding's blocks."""
    if quant == "int4":
        say("int4: dense and 8-bit linears are rounded to 4 bits (Q4_1's rule): an approximate model", once=True)
        for k in [k for k in state if k.endswith("proj.weight") or k == "lm_head.weight"]:
            b = quantize_4bit(state[k])
            if b is not None:
                blocks[k[:-len(".weight")]] = b
                del state[k]
    if quant in ("int4", "draft"):
        for k in [k for k in blocks if k != "model.embed_tokens" and "mins" not in blocks[k]]:
            blocks[k] = quantize_4bit(dequantize(blocks[k])) or blocks[k]
    kernel = device == "cpu" and dtype == torch.bfloat16 and quant != "none"
    if blocks and quant != "none" and not kernel:
        say(f"quantized weights run dequantised: qmatmul.cpp is for the CPU in bfloat16, not {device} {dtype}", once=True)
    kernel = kernel and qmatmul() is not None                # (which says why not, if it is not)
    embed = blocks.pop("model.embed_tokens", None)           # a lookup: dense
    if embed is not None:
        state["model.embed_tokens.weight"] = dequantize(embed).to(dtype)
    for k in [k for k in blocks if not kernel]:
        state[k + ".weight"] = dequantize(blocks.pop(k)).to(dtype)
    if config.tie_embeddings or "lm_head.weight" not in state and "lm_head" not in blocks:
        if embed is not None and kernel:
            blocks["lm_head"] = embed
        else:
            state["lm_head.weight"] = state.get("model.embed_tokens.weight")


def fuse(state, blocks, dtype):
    """HuggingFace checkpoints keep q, k, v (and gate, up) as separate matrices with the same
    input; stacked into one, a layer makes 4 matmul calls instead of 7, over the same bytes
    (each call has a fixed cost: about 0.1 ms on a 2-core CPU). Quantized linears become lists
    of parts: one part where all share a format, else one each (a part dense beside quantized
    ones is dequantised)."""
    for name in list(blocks):
        for fused, parts in FUSED.items():
            if name.endswith("." + parts[0]):
                names = [name[:-len(parts[0])] + p for p in parts]
                if all(n in blocks for n in names):
                    pieces = [blocks.pop(n) for n in names]
                    blocks[name[:-len(parts[0])] + fused] = \
                        [{k: torch.cat([b[k] for b in pieces]) for k in pieces[0]}] if same_format(pieces) else pieces
                else:
                    for n in [n for n in names if n in blocks]:
                        state[n + ".weight"] = dequantize(blocks.pop(n)).to(dtype)
    for name, b in blocks.items():
        if isinstance(b, dict):
            blocks[name] = [b]
    for key in list(state):
        for fused, parts in FUSED.items():
            if f".{parts[0]}." in key:
                pieces = [state.pop(key.replace(parts[0], p), None) for p in parts]
                if all(p is not None for p in pieces):
                    state[key.replace(parts[0], fused)] = torch.cat(pieces)


ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def read_config(path):
    """model.Config's fields from a model folder's config.json (HuggingFace's names), or ModelError."""
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
        return config_fields(c, path)
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise ModelError(f"{path / 'config.json'} lacks or mis-states a field: {type(e).__name__} {e}") from None


def config_fields(c, path):
    """model.Config's fields from config.json's object c; ModelError for a model it cannot run."""
    arch = (c.get("architectures") or ["(none)"])[0]
    if arch not in ARCHITECTURES:
        raise ModelError(f"unsupported architecture {arch} in {path} (supported: {', '.join(ARCHITECTURES)})")
    scaling = c.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "default"):
        raise ModelError(f"unsupported rope_scaling {scaling} (supported: llama3)")
    n_heads = c["num_attention_heads"]
    fields = dict(
        arch=arch, vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=c.get("num_key_value_heads", n_heads),
        head_dim=c.get("head_dim") or c["hidden_size"] // n_heads, hidden_dim=c["intermediate_size"],
        norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=c.get("rope_theta", 10000.0),
        rope_scaling=scaling if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3" else None,
        max_seq_len=c.get("max_position_embeddings", 4096), tie_embeddings=c.get("tie_word_embeddings", False),
        qkv_bias=arch == "Qwen2ForCausalLM", qk_norm=arch == "Qwen3ForCausalLM")
    sizes = tuple(fields[k] for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                                      "hidden_dim", "max_seq_len"))
    if not all(isinstance(v, int) and v > 0 for v in sizes) or fields["n_heads"] % fields["n_kv_heads"]:
        raise ModelError(f"{path / 'config.json'}: its sizes do not make a model ({sizes})")
    return fields


def load(model, path, device, dtype, quant):
    """The folder's weights into `model` (built on the meta device): dense tensors (memory-mapped,
    cast once) and quantized blocks as QLinear where qmatmul.cpp runs them, then every dense
    linear packed for the CPU. quant: "auto" runs blocks where the folder holds them, "draft"
    too with 8-bit ones rounded to 4 bits, "none" dequantises them, "int4" also rounds dense
    linears to 4 bits (lossy)."""
    state, blocks = read_state(path, device, dtype)
    place_blocks(state, blocks, model.config, device, dtype, quant)
    fuse(state, blocks, dtype)
    for name, parts in blocks.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ModelError(f"weights in {path} quantize {name}, which {model.config.arch} does not have") from None
        q = QLinear(parts, state.pop(name + ".bias", None))
        if (q.out_features, q.in_features) != (old.out_features, old.in_features):
            raise ModelError(f"weights in {path} do not fit its config.json: {name} is {q.out_features} x "
                             f"{q.in_features}, the config implies {old.out_features} x {old.in_features}")
        model.set_submodule(name, q)
    missing = [k for k in model.state_dict() if state.get(k) is None]
    if missing:
        raise ModelError(f"weights in {path} lack {len(missing)} tensors, e.g. {missing[0]}")
    wrong = [(k, v.shape) for k, v in model.state_dict().items() if state[k].shape != v.shape]
    if wrong:
        k, shape = wrong[0]
        raise ModelError(f"weights in {path} do not fit its config.json: {k} is {tuple(state[k].shape)}, "
                         f"the config implies {tuple(shape)}")
    model.load_state_dict({k: state[k] for k in model.state_dict()}, assign=True)
    pack(model)
    del state, blocks
    release()


def release():
    """Give the loader's freed buffers back to the OS. glibc keeps freed heap memory for reuse,
    and a load frees about as much as it keeps (the blocks as stored, before `tile`; dense
    weights before packing): measured, the demo pair held 4.7 GB of RSS for 2.4 GB of tensors."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):                # not glibc: its allocator decides
        pass


def pack(model):
    """Pack every dense linear for the CPU. Where that cannot be done (CUDA, float16 without
    AVX512-FP16, float64) the linears stay plain F.linear, and the reason is said once."""
    if model.device.type != "cpu":
        return say(f"linears on {model.device} run as F.linear (nothing to pack)", once=True)
    try:
        for m in model.modules():
            if isinstance(m, Linear):
                m.pack()
    except RuntimeError as e:
        say(f"linears run as F.linear, not packed for the CPU: {str(e).splitlines()[0]}", once=True)
