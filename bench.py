"""Benchmarks, measured side by side in one run: python bench.py [--full] [--only sampler|forward|e2e|numerics].

1. Sampler: latency of each rejection-sampling implementation (median of repeated calls
   after warm-up) for batch 1/2/4/8, K = 8 and three vocabularies, the speedup over the
   reference loop, the acceptance rate of each on identical inputs (they must agree), and
   the fraction of the memory floor reached: the bytes a call must read (the accept-test
   entries, then per row the p and q rows at its first rejection and the exponentials)
   over its time, against this device's measured copy bandwidth. Then the tree's contract
   (sampler.tree_sample) on 8 and 32 nodes with drawn and top-k children.
2. Forward passes: milliseconds and effective GB/s (bytes of weights read / time, as
   gpt-fast prints it) of one target and one draft forward over 1, 4, 8 and 16 new tokens
   after a 100-token cache, from the quantized blocks (qmatmul.cpp; the bytes are the
   blocks') and, with --dense, from dense bf16 weights.
3. End to end on a target/draft pair (default: the demo pair): autoregressive, chain
   (K = 2, 4, auto), tree (auto, auto without lookup, and with --full the paper's 25/200 budgets) on
   code and prose prompts (with --dense also ar, chain K=4 and tree auto on dense bf16 weights,
   --quant none, for the same-run ratio of blocks over dense: slow where oneDNN cannot pack bf16,
   on CPUs without AVX512); and on editing prompts (a 55-line
   file to return with a function renamed, or with an argument added) autoregressive,
   chain auto and tree auto with and without lookup, each run until the answer ends: an
   edit's worth is the whole file back, and its first 64 tokens would time mostly the
   prompt pass that every method pays (3.3 of the 10.5 seconds ar takes for them here).
   Per row: tokens/s, speedup over autoregressive, acceptance, tokens per target pass and
   draft passes; then tree auto against the fastest chain row of each prompt. --full
   adds sampled rows (T = 0.7 and 1.0, seed 1) and rejection sampling's rows beside
   coupled verification's.
   Every row that must equal autoregressive's output (all but rejection's) is checked token
   for token against ar on the same weights, in bfloat16 too (model.py's passes are
   batch-invariant); where one parts, the row says where: a bug.
   --repeat N runs every row N times in turn and reports each row's median run.
   --vs-hf adds transformers' generate, assisted generation (its default dynamic K, and
   K = 4 and 8 but on edits) and prompt lookup on the same folders, and the ratios against them.
4. Numerics (--only numerics, not in the default run): the target's perplexity on a file of
   Python's standard library and its greedy text, from its blocks as they run (int8
   activations on AVX2 CPUs) and from its exact weights in float32.
Writes bench_results.md and bench.png.
"""
import argparse
import json
import platform
import statistics
import time
from datetime import date

import torch

import linears
import model
import sampler
import specdecode as sd
import tree
import weights
from linears import say

EDIT_SOURCE = '''import csv
from collections import defaultdict
from dataclasses import dataclass


@dataclass
class Sale:
    region: str
    product: str
    units: int
    price: float


def read_sales(path):
    sales = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                units = int(row["units"])
                price = float(row["price"])
            except (KeyError, ValueError):
                continue
            if units <= 0 or price < 0:
                continue
            sales.append(Sale(row["region"].strip(), row["product"].strip(), units, price))
    return sales


def summarise(sales):
    totals = defaultdict(float)
    counts = defaultdict(int)
    for sale in sales:
        totals[sale.region] += sale.units * sale.price
        counts[sale.region] += sale.units
    report = []
    for region in sorted(totals):
        average = totals[region] / counts[region]
        report.append((region, round(totals[region], 2), counts[region], round(average, 2)))
    return report


def best_products(sales, top=3):
    revenue = defaultdict(float)
    for sale in sales:
        revenue[sale.product] += sale.units * sale.price
    ranked = sorted(revenue.items(), key=lambda item: item[1], reverse=True)
    return ranked[:top]


if __name__ == "__main__":
    import sys
    data = read_sales(sys.argv[1])
    for line in summarise(data):
        print(*line, sep="\\t")
    print(best_products(data))
'''

PROMPTS = {
    "code: CUDA kernel": "Write a CUDA kernel that adds two float vectors, with its launch code.",
    "code: Fibonacci": "Write a Python function that returns the n-th Fibonacci number, iteratively.",
    "prose": "Explain in a short paragraph why the sky is blue.",
    "edit: rename": "Rename the function summarise to summarize_by_region everywhere in this file and "
                    "return the whole file:\n\n```python\n" + EDIT_SOURCE + "```",
    "edit: add argument": "Give read_sales an argument min_units=1 and skip the rows with fewer units than that. "
                          "Return the whole file:\n\n```python\n" + EDIT_SOURCE + "```",
}
EDIT_TOKENS = 1024                                  # an edit ("edit: ...") runs until its answer ends
EDIT_METHODS = ("ar", "chain auto", "tree auto", "tree auto, no lookup")


def is_edit(prompt_name):
    return prompt_name.startswith("edit")


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device):
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    x = torch.empty(64 << 20, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    times = []
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * x.numel() * 4 / statistics.median(times)


def read_bandwidth(device):
    """Bytes per second of one read of 1 GiB (a sum over it, best of 5): the ceiling of every
    GB/s figure here, and with a model's bytes the floor of its one-token pass."""
    x = torch.ones(1 << 28, device=device)
    times = []
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        x.sum()
        sync(device)
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / min(times)


def realistic_inputs(B, K, V, g, device, dtype):
    """Target and draft probabilities that disagree like a real pair, drafts drawn from q."""
    logits = torch.randn(B, K + 1, V, generator=g) * 3
    p = torch.softmax(logits, -1)
    q = torch.softmax(logits[:, :K] + torch.randn(B, K, V, generator=g), -1)
    draft = sampler.draw(q, torch.empty_like(q).exponential_(generator=g))
    u, e = sampler.random_inputs(B, K, V, g)
    return [x.to(device) for x in (p.to(dtype), q.to(dtype), draft, u, e)]


def time_call(fn, inputs, device, reps):
    """Median seconds per call over rotating copies of the inputs (more than the cache holds)."""
    for _ in range(2):
        fn(*inputs[0])
    times = []
    for i in range(reps):
        args = inputs[i % len(inputs)]
        sync(device)
        t = time.perf_counter()
        fn(*args)
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_sampler(device, dtype, full):
    impls = ["reference", "torch"] + (["cuda"] if str(device).startswith("cuda") and sampler.cuda_extension() else [])
    bandwidth = copy_bandwidth(device)
    g, K, rows = torch.Generator().manual_seed(0), 8, []
    for V in (32000, 128256, 151936):
        for B in (1, 2, 4, 8):
            copies = 4 if str(device).startswith("cuda") else 1
            inputs = [realistic_inputs(B, K, V, g, device, dtype) for _ in range(copies)]
            row = {"V": V, "B": B}
            for impl in impls:
                reps = 30 if impl != "reference" or full else 8
                row[impl] = time_call(sampler.IMPLEMENTATIONS[impl], inputs, device, reps)
                tokens, n = sampler.IMPLEMENTATIONS[impl](*inputs[0])
                row[f"{impl} tokens"] = tokens.cpu()
                row[f"{impl} acc"] = float(n.float().mean()) / K
            first = row[f"{impls[0]} tokens"]
            row["agree"] = all(torch.equal(row.pop(f"{i} tokens"), first) for i in impls[1:]) and \
                len({row[f"{i} acc"] for i in impls}) == 1
            row.pop(f"{impls[0]} tokens", None)
            elem = torch.finfo(dtype).bits // 8
            must_read = B * K * 2 * elem + B * (2 * V * elem + V * 4)
            best = min(row[i] for i in impls[1:])
            row["floor"] = must_read / bandwidth / best
            rows.append(row)
            say(f"  sampler V={V} B={B}: " + ", ".join(f"{i} {row[i] * 1e6:.0f} us" for i in impls))
    return impls, rows, bandwidth


def bench_tree_sampler(device, dtype, impls):
    """sampler.tree_sample on one tree's nodes: R nodes, m = 4 candidates each, V = 151936;
    drawn children, top-k ones, or drawn ones after a lookup token (a point mass)."""
    g, rows = torch.Generator().manual_seed(0), []
    for R in (8, 32):
        for children in ("drawn", "top-k", "lookup + drawn"):
            p, q, cands, u, e, point = tree_inputs(R, 4, 151936, g, children)
            inputs = [[p.to(device, dtype), q.to(device, dtype) if q is not None else None, cands.to(device),
                       u.to(device), e.to(device), point.to(device)]]
            row = {"R": R, "children": children}
            for impl in impls:
                row[impl] = time_call(sampler.TREE_IMPLEMENTATIONS[impl], inputs, device, 10)
                row[f"{impl} out"] = [x.cpu() for x in sampler.TREE_IMPLEMENTATIONS[impl](*inputs[0])]
            outs = [row.pop(f"{i} out") for i in impls]
            row["agree"] = all(torch.equal(a, b) for o in outs[1:] for a, b in zip(o, outs[0]))
            rows.append(row)
            say(f"  tree sampler R={R} {children}: " + ", ".join(f"{i} {row[i] * 1e6:.0f} us" for i in impls))
    return rows


def tree_inputs(R, m, V, g, children):
    """Target and draft probabilities like bench's chain inputs; candidates drawn from q, or
    its top m, or drawn after a lookup token (p's argmax, as a right lookup proposes); and
    which candidates are point masses."""
    logits = torch.randn(R, V, generator=g) * 3
    p, q = torch.softmax(logits, -1), torch.softmax(logits + torch.randn(R, V, generator=g), -1)
    drawn = children != "top-k"
    cands = sampler.draw(q[:, None].expand(R, m, V), torch.empty(R, m, V).exponential_(generator=g)) if drawn \
        else q.topk(m, -1).indices
    point = torch.full((R, m), not drawn)
    if children == "lookup + drawn":
        cands[:, 0], point[:, 0] = p.argmax(-1), True
    return (p, q if drawn else None, cands, torch.rand(R, m, generator=g), torch.empty(V).exponential_(generator=g),
            point)


def tree_sampler_table(impls, rows):
    head = ["nodes", "children"] + [f"{i} (us)" for i in impls] + [f"{i} speedup" for i in impls[1:]] + ["same tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([str(r["R"]), r["children"]] + [f"{r[i] * 1e6:.0f}" for i in impls] +
                                       [f"{r['reference'] / r[i]:.1f}x" for i in impls[1:]] +
                                       ["yes" if r["agree"] else "NO"]) + " |")
    return "Tree verification (sampler.tree_sample), 4 candidates per node, V = 151936.\n\n" + "\n".join(lines)


def sampler_table(impls, rows, bandwidth, device, dtype):
    head = ["vocab", "batch"] + [f"{i} (us)" for i in impls] + [f"{i} speedup" for i in impls[1:]] + \
           [f"{i} acceptance" for i in impls] + ["same tokens", "floor reached"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["V"]), str(r["B"])] + [f"{r[i] * 1e6:.1f}" for i in impls] + \
                [f"{r['reference'] / r[i]:.1f}x" for i in impls[1:]] + [f"{r[f'{i} acc']:.3f}" for i in impls] + \
                ["yes" if r["agree"] else "NO", f"{100 * r['floor']:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return (f"K = 8, {dtype}, {device}; copy bandwidth {bandwidth / 1e9:.1f} GB/s; floor = bytes the call must "
            f"read / bandwidth, over the fastest non-reference time.\n\n" + "\n".join(lines))


def weight_bytes(m, tokens):
    """Bytes of weights one forward over `tokens` new tokens reads: every linear (its blocks
    where it is a QLinear), the norms, and `tokens` rows of the embedding."""
    total = 0
    for mod in m.modules():
        if isinstance(mod, linears.Linear):
            total += mod.in_features * mod.out_features * m.dtype.itemsize
            total += mod.bias.numel() * mod.bias.element_size() if mod.bias is not None else 0
        elif isinstance(mod, linears.QLinear):
            total += sum(t.numel() * t.element_size() for p in mod.parts for t in p[:5])   # p[5]: a flag
        elif isinstance(mod, model.RMSNorm):
            total += mod.weight.numel() * mod.weight.element_size()
    return total + tokens * m.config.dim * m.dtype.itemsize


WIDTHS = (1, 4, 8, 16)


def bench_forward(a, reps=21):
    """Median ms and GB/s of one forward over WIDTHS new tokens after a 100-token cache, from
    blocks (and with --dense from dense weights). The cases take turns within each repetition,
    so a noisy spell of the machine hits them alike. Then where a one-token pass goes."""
    dtype = getattr(torch, a.dtype)
    models = {}
    for quant, label in (("auto", "blocks"), ("none", f"dense {a.dtype}"))[:2 if a.dense else 1]:
        (t, _), (d, _) = sd.load_pair(a.target, a.draft, a.device, dtype, quant)
        models.update({f"target ({label})": t, f"draft ({label})": d})
    for m in models.values():
        m.setup_cache(128)
        m(torch.randint(0, 1000, (1, 100), device=m.device), last=1)
    times = {(name, tokens): [] for name in models for tokens in WIDTHS}
    for _ in range(reps):
        for (name, tokens), ts in times.items():
            m = models[name]
            m.truncate(100)
            x = torch.randint(0, 1000, (1, tokens), device=m.device)
            sync(m.device)
            t = time.perf_counter()
            m(x, last=tokens)
            sync(m.device)
            ts.append(time.perf_counter() - t)
    rows, bandwidth = [], read_bandwidth(a.device)
    for (name, tokens), ts in times.items():
        s, nbytes = statistics.median(ts[1:]), weight_bytes(models[name], tokens)
        rows.append({"model": name, "tokens": tokens, "ms": s * 1e3, "GB/s": nbytes / s / 1e9, "bytes": nbytes,
                     "floor ms": nbytes / bandwidth * 1e3})
        say(f"  forward {name}, {tokens} tokens: {s * 1e3:.1f} ms, {rows[-1]['GB/s']:.1f} GB/s")
    return rows, bandwidth, {name: one_token_breakdown(m) for name, m in models.items()}


def one_token_breakdown(m, reps=10):
    """Of a one-token pass: ms in its linears (each call timed) and outside them, and
    torch.profiler's costliest ops outside them (qmatmul.cpp's calls are not torch ops)."""
    layers = [mod for mod in m.modules() if isinstance(mod, (linears.Linear, linears.QLinear))]
    spent = [0.0]

    def timed(f):
        def call(x):
            t = time.perf_counter()
            y = f(x)
            spent[0] += time.perf_counter() - t
            return y
        return call

    for mod in layers:
        mod.forward = timed(mod.forward)
    total = time.perf_counter()
    with torch.profiler.profile() as prof:
        for _ in range(reps):
            m.truncate(100)
            m(torch.tensor([[7]], device=m.device), last=1)
    total = time.perf_counter() - total
    for mod in layers:
        del mod.forward                                  # the class's forward again
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:6]
    return {"linears ms": spent[0] / reps * 1e3, "rest ms": (total - spent[0]) / reps * 1e3,
            "ops": [(e.key, e.count // reps, e.self_cpu_time_total / reps / 1e3) for e in ops]}


def forward_table(rows, bandwidth, breakdown):
    one = {r["model"]: r["ms"] for r in rows if r["tokens"] == 1}
    lines = ["| model | new tokens | weights read (GB) | ms | x 1 token | GB/s | x byte floor |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['tokens']} | {r['bytes'] / 1e9:.3f} | {r['ms']:.1f} | {r['ms'] / one[r['model']]:.2f}x "
              f"| {r['GB/s']:.1f} | {r['ms'] / r['floor ms']:.2f}x |" for r in rows]
    parts = [f"- {name}, one token (under the profiler): linears {b['linears ms']:.1f} ms, the rest {b['rest ms']:.1f} ms; "
             "costliest ops outside the linears, per pass: "
             + ", ".join(f"{k} {n}x {ms:.2f} ms" for k, n, ms in b["ops"]) for name, b in breakdown.items()]
    return (f"One forward after a 100-token cache (median of 20); GB/s = bytes of weights read / time "
            f"(blocks: their own bytes); this machine reads {bandwidth / 1e9:.1f} GB/s (1 GiB, best of 5), so the "
            "byte floor of a pass is its bytes / that.\n\n" + "\n".join(lines) + "\n\n" + "\n".join(parts))


def bench_numerics(a, tokens=512):
    """The target as it runs (its blocks: on AVX2 CPUs with int8 activations, qmatmul.cpp's
    `activations`) against its exact weights in float32 (the blocks dequantised): perplexity
    on the first `tokens` tokens of a file every Python has (the standard library's
    argparse.py), and where greedy text from the two first parts on the code and prose prompts."""
    import argparse as stdlib_file
    (ours, tok), = sd.load_pair(a.target, None, a.device, torch.bfloat16)[:1]
    exact = weights.load(a.target, a.device, torch.float32)[0]
    ids = tok.encode(open(stdlib_file.__file__).read())[:tokens]
    rows = []
    for name, m in ((f"blocks, {linears.qmatmul().activations} activations", ours), ("exact weights, float32", exact)):
        m.setup_cache(len(ids))
        logp = torch.log_softmax(m(torch.tensor([ids], device=m.device), last=len(ids))[0, :-1].float(), -1)
        nll = -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean()
        rows.append({"model": name, "perplexity": float(nll.exp())})
        say(f"  {name}: perplexity {rows[-1]['perplexity']:.4f} on {len(ids)} tokens of {stdlib_file.__file__}")
    partings = []
    for prompt_name, prompt in PROMPTS.items():
        if is_edit(prompt_name):
            continue
        prompt_ids = tok.encode(tok.chat(prompt))
        outs = [sd.generate(prompt_ids, (m, tok), None, sd.Options(mode="ar", max_new_tokens=a.tokens or 128))[0]
                for m in (ours, exact)]
        same = next((i for i, (x, y) in enumerate(zip(*outs)) if x != y), None)
        partings.append((prompt_name, "same" if same is None and len(outs[0]) == len(outs[1]) else f"parts at {same}"))
        say(f"  {prompt_name}: greedy text {partings[-1][1]}")
    return ("Perplexity of the target on the first {} tokens of the standard library's argparse.py, "
            "and greedy text (ar, {} tokens) of the blocks as run against the exact weights in float32:\n\n"
            .format(len(ids), a.tokens or 128)
            + "\n".join(f"- {r['model']}: {r['perplexity']:.4f}" for r in rows) + "\n"
            + "\n".join(f"- {p}: {w}" for p, w in partings))


PAPER = "tree 25/200 (paper)"     # a 201-token verify pass a step: --full only (minutes a prompt on 2 cores)
METHODS = {
    "ar": dict(mode="ar"),
    "chain K=2": dict(mode="chain", k=2),
    "chain K=4": dict(mode="chain", k=4),
    "chain auto": dict(mode="chain", k="auto"),
    "tree auto": dict(mode="tree", sizing="auto"),
    "tree auto, no lookup": dict(mode="tree", sizing="auto", lookup="off"),
    PAPER: dict(mode="tree", sizing="fixed", budget=tree.Budget(max_nodes_per_level=25, max_total_nodes=200)),
    "chain K=4, rejection": dict(mode="chain", k=4, verify="rejection"),      # sampled rows only: greedy
    "tree auto, rejection": dict(mode="tree", sizing="auto", verify="rejection"),   # is the same either way
    "ar, dense": dict(mode="ar", quant="none"),                    # the same rows on dense bf16 weights
    "chain K=4, dense": dict(mode="chain", k=4, quant="none"),
    "tree auto, dense": dict(mode="tree", sizing="auto", quant="none"),
}


def bench_e2e(a):
    """Every row of METHODS (EDIT_METHODS on an edit; and with --vs-hf transformers') on every
    prompt, --repeat times in turn; a row is its median run by tokens/s, and must equal ar's
    output in every run."""
    dtype = getattr(torch, a.dtype)
    rows = []
    temps = (0.0, 0.7, 1.0) if a.full else (0.0,)
    pairs = {q: sd.load_pair(a.target, a.draft, a.device, dtype, q) for q in ("auto", "none")[:2 if a.dense else 1]}
    target = pairs["auto"][0]
    for prompt_name, prompt in PROMPTS.items():
        edit = is_edit(prompt_name)
        max_new = EDIT_TOKENS if edit else a.tokens or (128 if a.full else 64)
        methods = {m: kw for m, kw in METHODS.items() if (m in EDIT_METHODS or not edit) and kw.get("quant", "auto") in pairs
                   and (a.full or m != PAPER)}
        ids = target[1].encode(target[1].chat(prompt))
        for temperature in temps:
            runs, ar_out = {}, {}
            for _ in range(a.repeat):
                for method, kw in methods.items():
                    if temperature == 0 and kw.get("verify") == "rejection":
                        continue
                    kw = dict(kw)
                    quant = kw.pop("quant", "auto")
                    tgt, draft = pairs[quant][0], pairs[quant][1] if kw["mode"] != "ar" else None
                    opts = sd.Options(max_new_tokens=max_new, settings=sd.Settings(temperature=temperature, seed=1), **kw)
                    out, stats = sd.generate(ids, tgt, draft, opts)
                    if kw["mode"] == "ar":
                        ar_out.setdefault(quant, out)
                    runs.setdefault(method, []).append((out, stats, opts, quant))
                    say(f"  {prompt_name} T={temperature} {method}: {stats.tokens_per_second:.2f} tok/s, "
                        f"{stats.tokens_per_pass:.2f} tok/pass")
                if a.vs_hf:
                    for r in bench_hf(a, prompt_name, ids, temperature, max_new, edit):
                        runs.setdefault(r["method"], []).append((None, r["stats"], None, "none"))
                if a.vs_llamacpp and temperature == 0:
                    for method, stats in bench_llamacpp(a, ids, max_new, target[1].stop_ids, edit).items():
                        runs.setdefault(method, []).append((None, stats, None, "none"))
            for method, done in runs.items():
                same = None
                if done[0][2] is not None and done[0][2].verify == "coupled":
                    want = ar_out[done[0][3]]
                    parted = next((out for out, _, _, _ in done if out != want), None)
                    same = parting(want, parted) if parted else True
                stats = sorted((d[1] for d in done), key=lambda s: s.tokens_per_second)[(len(done) - 1) // 2]
                rows.append({"prompt": prompt_name, "T": temperature, "method": method, "stats": stats, "same": same})
    return rows


def parting(ar_out, out):
    """Where a speculative output that must equal autoregressive's (greedy, or coupled
    verification) first differs from it: never, unless a forward is not batch-invariant."""
    i = next(j for j, (x, y) in enumerate(zip(ar_out, out + [-1] * len(ar_out))) if x != y)
    return f"PARTS at token {i}: a bug"


HF_ASSISTED = {"transformers assisted (default K)": {},      # up to 20 tokens, stopping below confidence 0.4
               "transformers assisted K=4": {"num_assistant_tokens": 4},
               "transformers assisted K=8": {"num_assistant_tokens": 8}}


def bench_hf(a, prompt_name, ids, temperature, max_new, edit):
    """transformers' generate, assisted generation and prompt lookup on the same folders
    (extra rows); a fixed K (not on edits) is set on the assistant's generation config with
    the confidence stop off."""
    import copy
    import transformers
    dtype = getattr(torch, a.dtype)
    if "hf" not in _hf:
        _hf["hf"] = [transformers.AutoModelForCausalLM.from_pretrained(str(weights.resolve(n, dense=True)), dtype=dtype).eval()
                     for n in (a.target, a.draft)]
    tgt, drf = _hf["hf"]
    x, rows, defaults = torch.tensor([ids]), [], copy.deepcopy(drf.generation_config)
    assisted = {m: kw for m, kw in HF_ASSISTED.items() if not (edit and kw)}
    for method, assist in {"transformers generate": None, **assisted, "transformers prompt lookup": None}.items():
        kw = dict(max_new_tokens=max_new, do_sample=temperature > 0)
        if temperature > 0:
            kw["temperature"] = temperature
        if method == "transformers prompt lookup":
            kw["prompt_lookup_num_tokens"] = 10           # its documented setting
        if assist is not None:
            kw["assistant_model"] = drf
            drf.generation_config = copy.deepcopy(defaults)
            if assist:
                drf.generation_config.update(num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0,
                                             **assist)
        t = time.perf_counter()
        out = tgt.generate(x, **kw)[0, len(ids):].tolist()
        seconds = time.perf_counter() - t
        stats = sd.Stats(mode="hf", prompt_tokens=len(ids), new_tokens=len(out), seconds=seconds)
        rows.append({"prompt": prompt_name, "T": temperature, "method": method, "stats": stats, "same": None})
        say(f"  {prompt_name} T={temperature} {method}: {stats.tokens_per_second:.2f} tok/s")
    drf.generation_config = defaults
    return rows


_hf = {}


def bench_llamacpp(a, ids, max_new, stop_ids, edit):
    """llama.cpp (llama-cpp-python, built from source with this machine's flags) on the same
    GGUF files, token ids, threads and token counts, greedy: its plain decoding, the bar, and on
    edits its one built-in speculative mode, prompt lookup (LlamaPromptLookupDecoding, its
    default 10 tokens). Timed end to end like our rows: the prompt's pass, then each token."""
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    gguf = weights.home() / "gguf" / f"{a.target}.gguf"
    kinds = {LLAMA: None, **({"llama.cpp prompt lookup": LlamaPromptLookupDecoding} if edit else {})}
    out = {}
    for method, draft in kinds.items():
        key = (method, len(ids) + max_new)
        if key not in _llamacpp:
            _llamacpp.clear()                            # one model in memory at a time
            _llamacpp[key] = Llama(model_path=str(gguf), n_ctx=len(ids) + max_new + 64, n_batch=512,  # 64: lookup's guesses
                                   n_threads=torch.get_num_threads(), draft_model=draft and draft(),
                                   logits_all=draft is not None, verbose=False)   # (its drafts need every position's)
        llm, new = _llamacpp[key], []
        t = time.perf_counter()
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            new.append(token)
            if token in stop_ids or len(new) == max_new:
                break
        stats = sd.Stats(mode="llama.cpp", prompt_tokens=len(ids), new_tokens=len(new), seconds=time.perf_counter() - t)
        say(f"  {method}: {stats.tokens_per_second:.2f} tok/s")
        out[method] = stats
    return out


_llamacpp = {}


LLAMA = "llama.cpp plain"


def e2e_table(rows):
    head = ["prompt", "T", "method", "tokens/s", "speedup vs ar", "x llama.cpp", "acceptance", "tokens/pass",
            "mean tree", "draft passes", "output == ar"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {(r["prompt"], r["T"]): r["stats"].tokens_per_second for r in rows if r["method"] == "ar"}
    bar = {(r["prompt"], r["T"]): r["stats"].tokens_per_second for r in rows if r["method"] == LLAMA}
    for r in rows:
        s, key = r["stats"], (r["prompt"], r["T"])
        lines.append("| " + " | ".join([
            r["prompt"], f"{r['T']:g}", r["method"], f"{s.tokens_per_second:.2f}",
            f"{s.tokens_per_second / base[key]:.2f}x", f"{s.tokens_per_second / bar[key]:.2f}x" if key in bar else "-",
            f"{s.acceptance:.2f}" if s.mode in ("chain", "tree") else "-",
            f"{s.tokens_per_pass:.2f}" if s.target_passes else "-",
            f"{s.drafted / s.target_passes:.1f}" if s.mode == "tree" and s.target_passes else "-",
            str(s.draft_passes) if s.mode not in ("hf", "llama.cpp") else "-",
            "-" if r["same"] is None else r["same"] if isinstance(r["same"], str) else "yes"]) + " |")
    return "\n".join(lines)


def fresh_rows(rows):
    """The rows of the code and prose prompts: every method runs on them (not on the edits)."""
    return [r for r in rows if not is_edit(r["prompt"])]


def median_speedups(rows):
    """Per method: the median over the code and prose prompts of tokens/s divided by ar's in
    the same run."""
    base = {(r["prompt"], r["T"]): r["stats"].tokens_per_second for r in rows if r["method"] == "ar"}
    out = {}
    for r in fresh_rows(rows):
        out.setdefault(r["method"], []).append(r["stats"].tokens_per_second / base[(r["prompt"], r["T"])])
    return {m: statistics.median(v) for m, v in out.items()}


def tree_vs_chain(rows):
    """Median over prompts of tree auto's tokens/s and tokens per target pass, each over the
    fastest chain row of the same prompt (chain's best K there)."""
    speed, per_pass = [], []
    for key in {(r["prompt"], r["T"]) for r in rows}:
        same = [r for r in rows if (r["prompt"], r["T"]) == key]
        best = max((r for r in same if r["method"].startswith("chain") and "dense" not in r["method"]), key=lambda r: r["stats"].tokens_per_second)
        t = next(r for r in same if r["method"] == "tree auto")
        speed.append(t["stats"].tokens_per_second / best["stats"].tokens_per_second)
        per_pass.append(t["stats"].tokens_per_pass / best["stats"].tokens_per_pass)
    return statistics.median(speed), statistics.median(per_pass)


def versus(rows, ours, theirs, prompts):
    """Median over `prompts` of the `ours` row's tokens/s over the fastest of the `theirs` rows."""
    ratios = []
    for p in prompts:
        same = [r for r in rows if r["prompt"] == p and r["T"] == 0]
        mine = next(r for r in same if r["method"] == ours)["stats"].tokens_per_second
        ratios.append(mine / max(r["stats"].tokens_per_second for r in same if r["method"] in theirs))
    return statistics.median(ratios)


def summary(rows):
    """The ratios the project is judged by, each from this run's rows."""
    code = [p for p in PROMPTS if p.startswith("code")]
    edit = [p for p in PROMPTS if is_edit(p)]
    fresh = [p for p in PROMPTS if not is_edit(p)]
    lines = ["Median speedup over autoregressive on the code and prose prompts: "
             + ", ".join(f"{m} {v:.2f}x" for m, v in median_speedups(rows).items()),
             "", "Tree auto over the fastest chain row of each prompt (median): {:.2f}x tokens/s, "
             "{:.2f}x tokens per target pass.".format(*tree_vs_chain(rows)),
             "", f"Prose: tree auto {versus(rows, 'tree auto', ['ar'], ['prose']):.2f}x ar, "
             f"chain auto {versus(rows, 'chain auto', ['ar'], ['prose']):.2f}x ar.",
             "", f"Editing: tree auto (lookup on) {versus(rows, 'tree auto', ['ar'], edit):.2f}x ar and "
             f"{versus(rows, 'tree auto', ['tree auto, no lookup'], edit):.2f}x tree auto without lookup; "
             f"fresh prompts: {versus(rows, 'tree auto', ['tree auto, no lookup'], fresh):.2f}x (medians)."]
    for T in sorted({r["T"] for r in rows if r["method"].endswith("rejection")}):
        ratio = lambda m, f: statistics.median(
            f(next(r for r in rows if r["prompt"] == p and r["T"] == T and r["method"] == m)["stats"])
            / f(next(r for r in rows if r["prompt"] == p and r["T"] == T and r["method"] == m + ", rejection")["stats"])
            for p in fresh)
        lines += ["", f"T={T:g}, coupled verification over rejection sampling (median over the code and "
                  "prose prompts): "
                  f"chain K=4 {ratio('chain K=4', lambda s: s.tokens_per_pass):.2f}x tokens per pass, "
                  f"tree auto {ratio('tree auto', lambda s: s.tokens_per_pass):.2f}x tokens per pass and "
                  f"{ratio('tree auto', lambda s: s.tokens_per_second):.2f}x tokens/s."]
    if any(r["method"].startswith("transformers") for r in rows):
        lines += ["", "Against transformers, medians over the code prompts: "
                  f"ar {versus(rows, 'ar', ['transformers generate'], code):.2f}x transformers' generate; "
                  f"tree auto {versus(rows, 'tree auto', HF_ASSISTED, code):.2f}x transformers' assisted "
                  f"generation at its best K (default, 4, 8); "
                  f"chain auto {versus(rows, 'chain auto', HF_ASSISTED, code):.2f}x.",
                  "", f"Editing: tree auto "
                  f"{versus(rows, 'tree auto', ['transformers prompt lookup'], edit):.2f}x "
                  "transformers' prompt lookup."]
    if any(r["method"] == LLAMA for r in rows):
        on = lambda m, prompts: f"{versus(rows, m, [LLAMA], prompts):.2f}x"
        lines += ["", f"Against llama.cpp's plain decoding (same GGUF, threads and tokens; medians): ar {on('ar', code)} "
                  f"on code, {on('ar', ['prose'])} on prose; tree auto (the default) {on('tree auto', code)} on code, "
                  f"{on('tree auto', ['prose'])} on prose, {on('tree auto', edit)} on edits. llama.cpp's prompt "
                  f"lookup: {on('llama.cpp prompt lookup', edit)} its plain decoding on edits."]
    return "\n".join(lines)


def plot(path, sampler_rows, impls, e2e_rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = (1 if sampler_rows else 0) + (2 if e2e_rows else 0)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    axes = list(axes[0])
    if e2e_rows:
        speed = median_speedups(e2e_rows)
        ax = axes.pop(0)
        ax.bar(list(speed), list(speed.values()), color="#1f77b4")
        ax.axhline(1, color="gray", lw=0.8)
        ax.set_title("median speedup over autoregressive (code, prose)")
        ax.tick_params(axis="x", rotation=30)
        per_pass = {}
        for r in fresh_rows(e2e_rows):
            if r["stats"].target_passes:
                per_pass.setdefault(r["method"], []).append(r["stats"].tokens_per_pass)
        ax = axes.pop(0)
        ax.bar(list(per_pass), [statistics.median(v) for v in per_pass.values()], color="#2ca02c")
        ax.set_title("median tokens per target pass (code, prose)")
        ax.tick_params(axis="x", rotation=30)
    if sampler_rows:
        ax = axes.pop(0)
        V = max(r["V"] for r in sampler_rows)
        for impl in impls:
            pts = [(r["B"], r[impl] * 1e6) for r in sampler_rows if r["V"] == V]
            ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("latency (us)")
        ax.set_title(f"rejection sampler, V = {V}, K = 8")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cpu_name():
    """The CPU's model name (lscpu's) and its bf16 units: ratios compare only within one kind."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), platform.machine())
    units = [f for f in ("amx_bf16", "avx512_bf16") if f" {f}" in info]
    return name + (f" ({', '.join(units)})" if units else "")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="longer runs: 128 tokens, sampled rows too, more repeats")
    p.add_argument("--tokens", type=int, help="new tokens per end-to-end run on the code and prose prompts "
                                              "(default 64, 128 with --full; an edit runs until its answer ends)")
    p.add_argument("--repeat", type=int, default=1, help="end-to-end runs per row, in turn; each row is the median")
    p.add_argument("--only", choices=("sampler", "forward", "e2e", "numerics"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--target", default=weights.DEMO_TARGET)
    p.add_argument("--draft", default=weights.DEMO_DRAFT)
    p.add_argument("--vs-hf", action="store_true", help="add transformers' generate and assisted generation")
    p.add_argument("--dense", action="store_true", help="add forwards and rows on dense bf16 weights")
    p.add_argument("--vs-llamacpp", action="store_true", help="add llama.cpp's plain decoding (and prompt lookup "
                                                               "on edits) on the same GGUF files: the bar")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    a = p.parse_args()
    if a.repeat < 1:
        p.error("--repeat must be at least 1")
    if a.vs_hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            p.error("--vs-hf needs transformers (pip install -r requirements-test.txt)")
    if a.vs_llamacpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            p.error("--vs-llamacpp needs llama-cpp-python (pip install -r requirements-bench.txt)")
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    md = [f"# specdecode benchmark\n\nMeasured {date.today()} on {a.device} ({machine}), {a.dtype}.\n"]
    sampler_rows, impls, e2e_rows = [], [], []
    if a.only in (None, "sampler"):
        say("sampler micro-benchmark ...")
        impls, sampler_rows, bandwidth = bench_sampler(a.device, getattr(torch, a.dtype), a.full)
        tree_rows = bench_tree_sampler(a.device, getattr(torch, a.dtype), impls)
        md += ["## Rejection sampler\n", sampler_table(impls, sampler_rows, bandwidth, a.device, a.dtype), "",
               tree_sampler_table(impls, tree_rows), ""]
    if a.only in (None, "forward", "e2e"):
        say("forward passes ...")
        md += ["## Forward passes\n", forward_table(*bench_forward(a)), ""]
    if a.only == "numerics":
        say("numerics: the blocks as run against the exact weights ...")
        md += ["## Numerics\n", bench_numerics(a), ""]
    if a.only in (None, "e2e"):
        say(f"end to end: {a.target} with draft {a.draft} ...")
        e2e_rows = bench_e2e(a)
        runs = f", each row the median of {a.repeat} runs taken in turn" if a.repeat > 1 else ""
        md += [f"## End to end: {a.target} with draft {a.draft}{runs}\n", e2e_table(e2e_rows), "", summary(e2e_rows), ""]
    text = "\n".join(md)
    open("bench_results.md", "w").write(text)
    if sampler_rows or e2e_rows:
        plot("bench.png", sampler_rows, impls, e2e_rows)
    print(text)
    if a.json:
        clean = [{k: (v.__dict__ if isinstance(v, sd.Stats) else v) for k, v in r.items()} for r in e2e_rows]
        json.dump({"sampler": sampler_rows, "e2e": clean}, open(a.json, "w"), indent=1, default=str)
    say("wrote bench_results.md and bench.png")


if __name__ == "__main__":
    main()
