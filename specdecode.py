"""Speculative decoding from the command line: autoregressive, chain and tree.

    python specdecode.py                                   # the demo pair, tree --tree auto, a coding prompt
    python specdecode.py --mode chain --k 4 --prompt "Write quicksort in C"
    echo "Explain RoPE" | python specdecode.py --prompt - --temperature 0.7

ar     one target forward per token (the baseline).
chain  the draft proposes K tokens one by one; ONE target forward scores all K+1
       positions; sampler.rejection_sample keeps the longest prefix the target agrees with
       plus one token of its own, so every step yields 1..K+1 tokens from the target's
       exact distribution.
tree   the draft grows a token tree (tree.py); ONE target forward scores every node under
       a tree attention mask; the longest accepted root-to-leaf path is kept.

Verification is coupled by default (sampler.py): position t of the output races with
exponentials drawn from (seed, t), so every mode emits exactly the tokens `ar` samples with
the same seed; --verify rejection uses rejection sampling instead. In the auto modes a
Gate takes plain target steps, with no draft forward, while those are measured faster.

Each loop keeps one list `tokens` (prompt + output). Every cache holds a prefix of it;
a forward feeds whatever the cache lacks (the whole prompt the first time), so there is
no separate prefill, and rolling back is setting the cache length.
"""
import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import sampler
import tree
import weights
from model import SpecdecodeError      # every refusal's base class: what Python API users catch

DEFAULT_PROMPT = "Write a Python function that checks whether a number is prime, with a short docstring."


class SpecError(SpecdecodeError):
    """Bad options or input, said in one line."""


def whole(x):
    return isinstance(x, int) and not isinstance(x, bool)


def finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class Settings:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        """Refuse what would sample nonsense, for the command line and the Python API alike."""
        if not finite(self.temperature) or self.temperature < 0:
            raise SpecError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not whole(self.top_k) or self.top_k < 0:
            raise SpecError(f"top-k must be a whole number >= 0 (0 = off), got {self.top_k!r}")
        if not finite(self.top_p) or not 0 < self.top_p <= 1:
            raise SpecError(f"top-p must lie in (0, 1], got {self.top_p!r}")
        if not whole(self.seed) or not 0 <= self.seed < 2 ** 63:
            raise SpecError(f"seed must be a whole number in [0, 2^63), got {self.seed!r}")

    def probs(self, logits):
        return sampler.probs(logits, self.temperature, self.top_k, self.top_p)


@dataclass
class Stats:
    mode: str = "ar"
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft: float = 0.0            # seconds to the first new token
    seconds: float = 0.0
    target_passes: int = 0
    draft_passes: int = 0
    drafted: int = 0             # tokens the target checked: K per chain step, nodes per tree
    accepted: int = 0            # draft tokens the target kept
    from_lookup: int = 0         # tree: of those, tokens only the lookup proposed
    t_draft: float = 0.0
    t_target: float = 0.0
    t_sample: float = 0.0
    plain_steps: int = 0         # auto modes: target steps taken without the draft (Gate)
    ks: list = field(default_factory=list)   # K (chain) or accepted depth (tree) per step

    @property
    def tokens_per_second(self):
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_pass(self):
        return self.new_tokens / self.target_passes if self.target_passes else 0.0

    @property
    def acceptance(self):
        return self.accepted / self.drafted if self.drafted else float("nan")

    def line(self):
        s = (f"{self.mode}: prompt {self.prompt_tokens} tokens, {self.new_tokens} new, "
             f"first token {self.ttft:.2f} s, {self.tokens_per_second:.2f} tokens/s")
        if self.mode != "ar":
            other = self.seconds - self.t_draft - self.t_target - self.t_sample
            s += (f", {self.target_passes} target passes, {self.tokens_per_pass:.2f} tokens/pass, "
                  f"acceptance {self.acceptance:.2f}, time draft {self.t_draft:.1f} s / target {self.t_target:.1f} s"
                  f" / sampling {self.t_sample:.2f} s / other {other:.2f} s")
        if self.mode == "tree":
            s += (f", mean tree {self.drafted / max(1, self.target_passes):.1f} nodes, mean accepted depth "
                  f"{sum(self.ks) / max(1, len(self.ks)):.2f}, accepted from lookup {self.from_lookup} / "
                  f"from the draft {self.accepted - self.from_lookup}")
        if self.mode == "chain" and self.ks:
            s += f", mean K {sum(self.ks) / len(self.ks):.1f}"
        if self.plain_steps:
            s += f", steps without the draft {self.plain_steps}"
        return s


class Timer:
    """Adds the seconds spent in a `with` block to stats.<name> (after syncing CUDA work),
    and keeps them as .seconds for the cost model."""

    def __init__(self, stats, name, device):
        self.stats, self.name, self.cuda = stats, name, str(device).startswith("cuda")

    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t
        setattr(self.stats, self.name, getattr(self.stats, self.name) + self.seconds)


def feed(model, tokens, extra=(), last=1):
    """Run the model on what its cache lacks of `tokens`, then `extra`; logits of the last
    `last` tokens [1, last, V]."""
    new = tokens[model.length:] + list(extra)
    return model(torch.tensor([new], device=model.device), last=last)


def best_k(history, costs, k_max=12):
    """K maximising expected tokens per second over the recent steps' (K, accepted n).

    Whether draft j is accepted does not depend on how many were drafted after it, so a
    past step with n < K would have yielded 1 + min(n, k) tokens with any k. A step that
    accepted all K is extended past K as if each further draft were accepted with the
    per-position rate alpha seen so far. Acceptance comes in runs (boilerplate code), which
    this keeps and a single i.i.d. rate would lose. Cost: k draft steps plus one target pass
    over k + 1 tokens, as measured; until the target has been timed at two sizes, a K of an
    untimed size is taken, so that the price of K is measured, not guessed."""
    accepted = sum(n for _, n in history)
    alpha = min(accepted / max(1, accepted + sum(n < K for K, n in history)), 0.99)

    def tokens(k):
        return sum(1 + min(n, k) if n < K or k <= K else 1 + K + alpha * (1 - alpha ** (k - K)) / (1 - alpha)
                   for K, n in history) / len(history)
    ks, sizes = range(1, k_max + 1), costs.target_sizes()
    if len(sizes) < 2:      # a probe: until two sizes of target pass are timed, the price of K is a guess
        ks = [k for k in ks if k + 1 not in sizes]
    return max(ks, key=lambda k: tokens(k) / (k * costs.draft_pass(1) + costs.target_pass(k + 1)))


def plain_step(target, tokens, opts, stats):
    """One target forward, one token: position t races with E_t (sampler.Races), so a seed's
    sample is the same whichever mode produced the tokens before it."""
    with Timer(stats, "t_target", target.device):
        logits = feed(target, tokens)[0, -1, :opts.vocab]
    stats.target_passes += 1
    with Timer(stats, "t_sample", target.device):
        token = int(sampler.draw(opts.settings.probs(logits), opts.races.at(len(tokens))[0]))
    tokens.append(token)
    return [token]


def decode_ar(target, draft, tokens, opts, stats):
    """One target forward per token."""
    while True:
        yield plain_step(target, tokens, opts, stats)


class Gate:
    """Auto modes: speculate, or take a plain target step with no draft forward, whichever
    gave more tokens per second over its last 8 steps (measured, not modelled). The other
    kind is tried again after `wait` steps of this one: 8 at first, a full window, so that a
    draft that cannot pay (float32 on a CPU where a batched pass costs much more than one
    token) is dropped early, but not on the noise of a few first trees (after 4, a plain
    probe outran the demo pair's first trees on a fresh code prompt in 2 of 3 runs, and a
    draft worth 1.2x was dropped); then 8, doubling to 64 while those tries keep losing (a
    probe costs about half a step's worth of tokens: at most 1-2% of the run)."""

    def __init__(self):
        self.steps = {True: [], False: []}             # speculated? -> [(tokens, seconds)]
        self.current, self.since, self.wait = True, 0, 8

    def rate(self, speculated):
        steps = self.steps[speculated]
        return sum(n for n, _ in steps) / sum(s for _, s in steps) if steps else 0.0

    def speculate(self):
        return self.current if self.since < self.wait else not self.current

    def observe(self, speculated, tokens, seconds):
        self.steps[speculated] = (self.steps[speculated] + [(tokens, seconds)])[-8:]
        if speculated == self.current:
            self.since += 1
            return
        if self.rate(speculated) > self.rate(self.current):    # the probe won: switch
            self.current, self.wait = speculated, 8
        else:
            self.wait = max(8, min(64, 2 * self.wait))
        self.since = 0


def gated(step, target, draft, tokens, opts, stats, auto):
    """Run step() (a speculative step: its new tokens) or, where the Gate says the draft does
    not pay (auto modes only), a plain target step; time each once both models have passed
    over the prompt (tree with lookup feeds the draft only when first needed)."""
    gate = Gate() if auto else None
    while True:
        speculate, t0 = gate is None or gate.speculate(), time.perf_counter()
        warm = target.length > 0 and draft.length > 0
        new = step() if speculate else plain_step(target, tokens, opts, stats)
        stats.plain_steps += not speculate
        if gate and warm:
            gate.observe(speculate, len(new), time.perf_counter() - t0)
        yield new


def decode_chain(target, draft, tokens, opts, stats):
    """Draft K tokens, verify K+1 positions in one target pass, keep what rejection sampling
    (or coupled verification) keeps."""
    k, history, costs = (4 if opts.k == "auto" else opts.k), [], tree.Costs()
    coupled = opts.verify == "coupled"

    def step():
        nonlocal k, history
        start, qs, drafts = len(tokens), [], []
        warm = target.length > 0                      # the first step's passes include the prompt: not timed
        for i in range(k):
            fed = start + i - draft.length              # > 1 after plain steps: the draft catches up
            with Timer(stats, "t_draft", draft.device) as timer:
                q = opts.settings.probs(feed(draft, tokens[:start] + drafts)[0, -1, :opts.vocab])
                e = opts.races.at(start + i)[0] if coupled else exponentials(opts)
                drafts.append(int(sampler.draw(q, e)))
            if warm:
                costs.add_draft(fed, timer.seconds)
            qs.append(q)
        with Timer(stats, "t_target", target.device) as timer:
            logits = feed(target, tokens, drafts, last=k + 1)[:, :, :opts.vocab]
        if warm:
            costs.add_target(k + 1, timer.seconds)
        with Timer(stats, "t_sample", target.device):
            p, proposed = opts.settings.probs(logits), torch.tensor([drafts], device=opts.device)
            if coupled:
                out, n = sampler.coupled_sample(p, proposed, opts.races.at(start, k + 1)[None])
            else:
                u, e = sampler.random_inputs(1, k, opts.vocab, opts.generator, opts.device, one_hot=opts.greedy)
                out, n = sampler.rejection_sample(p, torch.stack(qs)[None], proposed, u, e)
            n = int(n)
            new = out[0, :n + 1].tolist()
        target.truncate(start + n)
        draft.truncate(min(draft.length, start + n))
        stats.target_passes += 1
        stats.draft_passes += k
        stats.drafted += k
        stats.accepted += n
        stats.ks.append(k)
        tokens.extend(new)
        if opts.k == "auto":
            history = (history + [(k, n)])[-32:]
            k = best_k(history, costs)
        return new
    yield from gated(step, target, draft, tokens, opts, stats, auto=opts.k == "auto")


def exponentials(opts):
    """E ~ Exp(1) over the vocabulary: one exponential race (sampler.draw); ones when greedy."""
    return sampler.exponentials(opts.vocab, generator=opts.generator, device=opts.device, one_hot=opts.greedy)


def decode_tree(target, draft, tokens, opts, stats):
    """Grow a token tree with the draft, verify it in one target pass, keep the accepted path."""
    sizer = tree.AutoSize(draft.config.layer_weights / target.config.layer_weights) if opts.tree_size == "auto" else None
    lookup = tree.Lookup() if opts.lookup == "auto" else None
    coupled = opts.verify == "coupled"

    def step():
        start, t0 = len(tokens), time.perf_counter()
        warm, fed = target.length > 0, draft.length > 0     # the prompt passes are no step's cost
        with Timer(stats, "t_draft", draft.device):
            t = tree.grow(draft, tokens, opts.settings, opts.vocab, opts.generator, opts.budget, sizer,
                          races=opts.races if coupled else None, lookup=lookup)
        with Timer(stats, "t_target", target.device) as timer:
            logits = tree.score(target, tokens, t)[0, :, :opts.vocab]
        if sizer and warm:
            sizer.costs.add_target(len(t.tokens) + 1, timer.seconds)
        with Timer(stats, "t_sample", target.device):
            p = opts.settings.probs(logits)
            if coupled:
                path, new = tree.verify_coupled(t, p, opts.races.at(start, max(t.depths, default=0) + 1))
            else:
                path, new = tree.verify(t, p, opts.generator, one_hot=opts.greedy)
        tree.compact(target, draft, start, t, path)
        if sizer:
            sizer.observe(t, path)
            seconds = time.perf_counter() - t0
            if not warm and not t.levels:             # the target's prompt pass alone: it prices catch-ups
                sizer.add_prompt(start, seconds)
            elif warm and (fed or not t.levels):      # any later step but the one that fed the draft its prompt
                sizer.add_step(t, path, seconds)
        if lookup:
            lookup.observe(t, path)
        stats.target_passes += 1
        stats.draft_passes += t.levels
        stats.drafted += len(t.tokens)
        stats.accepted += len(path)
        stats.from_lookup += sum(t.sources[i] == "lookup" for i in path)
        stats.ks.append(len(path))
        if opts.on_tree:
            opts.on_tree(t, path, new)
        tokens.extend(t.tokens[i] for i in path)
        tokens.append(new)
        return [t.tokens[i] for i in path] + [new]
    yield from gated(step, target, draft, tokens, opts, stats, auto=opts.tree_size == "auto")


DECODERS = {"ar": decode_ar, "chain": decode_chain, "tree": decode_tree}


@dataclass
class Options:
    mode: str = "tree"
    settings: Settings = field(default_factory=Settings)
    max_new_tokens: int = 128
    k: object = "auto"                      # chain: int or "auto"
    budget: tree.Budget = field(default_factory=tree.Budget)
    tree_size: str = "auto"                 # tree: "auto" (AutoSize) or "fixed" (fill the budgets)
    verify: str = "coupled"                 # "coupled" (a seed reproduces ar's sample) or "rejection"
    lookup: str = "auto"                    # tree: "auto" (lookup candidates where they pay) or "off"
    on_tree: object = None                  # callback(tree, accepted path, emitted token) per step
    vocab: int = 0                          # set by generate: the shared tokenizer's size
    device: object = "cpu"
    generator: object = None                # rejection sampling's random numbers
    races: object = None                    # sampler.Races: the exponentials of each output position

    @property
    def greedy(self):
        return self.settings.temperature == 0

    def check(self):
        """Refuse options that make no sense, before any model loads; one line each."""
        if self.mode not in DECODERS:
            raise SpecError(f"mode must be one of {', '.join(DECODERS)}, got {self.mode!r}")
        if not whole(self.max_new_tokens) or self.max_new_tokens < 1:
            raise SpecError(f"max-new-tokens must be a whole number >= 1, got {self.max_new_tokens!r}")
        if self.k != "auto" and (not whole(self.k) or self.k < 1):
            raise SpecError(f"k must be a whole number >= 1 or 'auto', got {self.k!r}")
        if self.tree_size not in ("auto", "fixed"):
            raise SpecError(f"tree_size must be 'auto' or 'fixed', got {self.tree_size!r}")
        if self.lookup not in ("auto", "off"):
            raise SpecError(f"lookup must be 'auto' or 'off', got {self.lookup!r}")
        if self.verify not in ("coupled", "rejection"):
            raise SpecError(f"verify must be 'coupled' or 'rejection', got {self.verify!r}")
        b = self.budget
        for name in ("max_depth", "max_nodes_per_level", "max_total_nodes", "branch"):
            if not whole(getattr(b, name)) or getattr(b, name) < 1:
                raise SpecError(f"{name.replace('_', '-')} must be a whole number >= 1, got {getattr(b, name)!r}")
        if b.branch > 15:
            raise SpecError("branch must be at most 15 (the CUDA tree sampler takes 16 candidates a node, "
                            "one of them a lookup token)")
        if not finite(b.max_time) or b.max_time <= 0:
            raise SpecError(f"max-time must be a finite number of seconds > 0, got {b.max_time!r}")
        if b.prune not in ("best", "random") or b.children not in ("auto", "top-k", "sample"):
            raise SpecError(f"prune must be best|random and children auto|top-k|sample, got {b.prune!r}, {b.children!r}")


def check_device(device):
    """A torch device this machine has, or SpecError."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise SpecError(f"unknown device {device!r} (try cpu or cuda)") from None
    if d.type not in ("cpu", "cuda"):
        raise SpecError(f"device {device!r}: specdecode runs on cpu or cuda")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"device {device!r}: no CUDA device here")


def check_pair(target, draft):
    """The draft must speak the target's tokenizer; decided by the vocabularies themselves."""
    if draft is not None and target[1].vocab() != draft[1].vocab():
        raise SpecError("the draft and target models use different tokenizers: pick a draft of the target's family")


def generate(prompt_ids, target, draft, opts: Options, on_tokens=None):
    """Generate up to opts.max_new_tokens after prompt_ids. target/draft: (model, tokenizer).
    Returns (new token ids, Stats)."""
    model, tok = target
    opts.check()
    if not prompt_ids:
        raise SpecError("the prompt is empty")
    if opts.mode != "ar" and draft is None:
        raise SpecError(f"--mode {opts.mode} needs a draft model")
    headroom = {"ar": 1, "chain": 13 if opts.k == "auto" else opts.k + 1, "tree": opts.budget.max_total_nodes + 1}[opts.mode]
    need, context = len(prompt_ids) + opts.max_new_tokens + headroom, model.config.max_seq_len
    if draft is not None:
        context = min(context, draft[0].config.max_seq_len)
    if need > context:
        raise SpecError(f"the prompt ({len(prompt_ids)} tokens) plus --max-new-tokens {opts.max_new_tokens} "
                        f"exceed the model's context of {context} tokens")
    opts.vocab = max(tok.vocab().values()) + 1
    opts.device = model.device
    opts.generator = torch.Generator(device=model.device).manual_seed(opts.settings.seed)
    opts.races = sampler.Races(opts.settings.seed, opts.vocab, model.device, one_hot=opts.greedy)
    model.setup_cache(need)
    if draft is not None:
        draft[0].setup_cache(need)
    stats, out, tokens = Stats(mode=opts.mode, prompt_tokens=len(prompt_ids)), [], list(prompt_ids)
    t0 = time.perf_counter()
    for new in DECODERS[opts.mode](model, draft and draft[0], tokens, opts, stats):
        if not out:
            stats.ttft = time.perf_counter() - t0
        stop = next((i for i, t in enumerate(new) if t in tok.stop_ids), None)
        new = new[:stop][:opts.max_new_tokens - len(out)]
        out += new
        if on_tokens:
            on_tokens(out)
        if stop is not None or len(out) >= opts.max_new_tokens:
            break
    stats.seconds, stats.new_tokens = time.perf_counter() - t0, len(out)
    return out, stats


_loaded = {}


def load_pair(target, draft=None, device="cpu", dtype=torch.bfloat16, draft_quant="int4"):
    """(model, tokenizer) for target and draft (names or folders), loaded once per process.
    draft_quant "int4" keeps 4-bit copies of the draft's weights for its one-token steps
    (model.Linear): the draft only proposes, so this changes speed and acceptance, never
    the output distribution."""
    pair = []
    for role, name in (("target", target), ("draft", draft)):
        if name is None:
            pair.append(None)
            continue
        int4 = role == "draft" and draft_quant == "int4"
        key = (role, str(name), str(device), dtype, int4)    # a draft equal to the target has its own cache
        if key not in _loaded:
            _loaded[key] = weights.load(name, device=device, dtype=dtype, int4=int4)
        pair.append(_loaded[key])
    check_pair(*pair)
    return pair


def speculative_decode(prompt, target=weights.DEMO_TARGET, draft=weights.DEMO_DRAFT, chat=True,
                       device="cpu", dtype=torch.bfloat16, draft_quant="int4", on_text=None, **options):
    """Python entry point: text and Stats for a prompt. `options` are Options fields
    (mode, max_new_tokens, k, tree_size, budget, on_tree) and Settings fields (temperature, top_k, top_p, seed)."""
    setting_names, option_names = set(Settings.__dataclass_fields__), set(Options.__dataclass_fields__)
    unknown = set(options) - setting_names - option_names
    if unknown:
        raise SpecError(f"unknown option(s): {', '.join(sorted(unknown))}")
    settings = Settings(**{k: v for k, v in options.items() if k in setting_names})
    opts = Options(settings=settings, **{k: v for k, v in options.items() if k not in setting_names})
    opts.check()
    check_device(device)
    if draft_quant not in ("int4", "none"):
        raise SpecError(f"draft_quant must be 'int4' or 'none', got {draft_quant!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise SpecError("the prompt is empty" if isinstance(prompt, str) else "the prompt must be text")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise SpecError("the prompt is not valid UTF-8 text") from None
    target, draft = load_pair(target, draft if opts.mode != "ar" else None, device, dtype, draft_quant)
    tok = target[1]
    ids = tok.encode(tok.chat(prompt) if chat and tok.chat_template else prompt)
    stream = Stream(tok, on_text) if on_text else None
    out, stats = generate(ids, target, draft, opts, stream)
    return tok.decode(out), stats


def enhanced_speculative_decode(prompt, max_tokens=13, max_nodes_per_level=25, max_total_nodes=200, max_time=10):
    """The tree paper's call: tree decoding with its budgets on the demo pair; returns the text."""
    budget = tree.Budget(max_nodes_per_level=max_nodes_per_level, max_total_nodes=max_total_nodes, max_time=max_time)
    text, _ = speculative_decode(prompt, mode="tree", tree_size="fixed", budget=budget, max_new_tokens=max_tokens)
    return text


class Stream:
    """Print text as tokens arrive: decode everything so far, print what is new, and hold
    back a trailing partial UTF-8 character (decoded as U+FFFD) until it completes."""

    def __init__(self, tok, write):
        self.tok, self.write, self.done = tok, write, 0

    def __call__(self, ids):
        text = self.tok.decode(ids)
        if text.endswith("\ufffd"):
            return
        self.write(text[self.done:])
        self.done = len(text)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise SpecError(message)


def parse_args(argv):
    p = Parser(description="Speculative decoding (autoregressive, chain, tree) for Llama/Qwen models.")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt; '-' reads stdin")
    p.add_argument("--mode", choices=DECODERS, default="tree",
                   help="default: tree with --tree auto, the fastest mode bench.py measured on the demo pair")
    p.add_argument("--target", default=weights.DEMO_TARGET, help="HuggingFace folder or demo name")
    p.add_argument("--draft", default=weights.DEMO_DRAFT, help="HuggingFace folder or demo name")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--k", default="auto", help="chain: draft tokens per step, or 'auto'")
    p.add_argument("--tree", choices=("auto", "fixed"), default="auto",
                   help="tree: size each tree from measured costs (auto) or fill the budgets (fixed)")
    p.add_argument("--max-depth", type=int, default=tree.Budget.max_depth)
    p.add_argument("--max-nodes-per-level", type=int, default=tree.Budget.max_nodes_per_level)
    p.add_argument("--max-total-nodes", type=int, default=tree.Budget.max_total_nodes)
    p.add_argument("--max-time", type=float, default=tree.Budget.max_time, help="seconds to grow one tree")
    p.add_argument("--branch", type=int, default=tree.Budget.branch, help="tree: children per expanded node")
    p.add_argument("--prune", choices=("best", "random"), default="best")
    p.add_argument("--verify", choices=("coupled", "rejection"), default="coupled",
                   help="coupled: position t races with exponentials from (seed, t), so a seed gives ar's text in "
                        "every mode; rejection: rejection sampling (accepts slightly more, text varies with the draft)")
    p.add_argument("--lookup", choices=("auto", "off"), default="auto",
                   help="tree: also propose what followed the last few tokens where they occurred before in the "
                        "prompt or output, at no draft cost, where the cost model expects gain (editing)")
    p.add_argument("--children", choices=("auto", "top-k", "sample"), default="auto",
                   help="tree, --verify rejection: top-k candidates or i.i.d. draws (auto: draws when temperature > 0)")
    p.add_argument("--viz", metavar="PNG", help="tree: draw the step with the most nodes")
    p.add_argument("--viz-dir", metavar="DIR", help="tree: one PNG per step and an animated GIF")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--draft-quant", choices=("int4", "none"), default="int4",
                   help="int4: the draft's one-token steps read 4-bit weights (CPU; about 2x faster), none: --dtype")
    a = p.parse_args(argv)
    if a.k != "auto":
        if not a.k.lstrip("-").isdigit() or int(a.k) < 1:
            raise SpecError(f"--k must be a whole number >= 1 or 'auto', got '{a.k}'")
        a.k = int(a.k)
    if (a.viz or a.viz_dir) and a.mode != "tree":
        raise SpecError("--viz and --viz-dir draw token trees: use them with --mode tree")
    check_device(a.device)
    if a.viz and not os.access(Path(a.viz).expanduser().resolve().parent, os.W_OK):   # said now, not after the run
        raise SpecError(f"--viz {a.viz}: its folder does not exist or cannot be written")
    if a.viz_dir:
        try:
            Path(a.viz_dir).expanduser().mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SpecError(f"--viz-dir {a.viz_dir}: {e.strerror or e}") from None
        if not os.access(Path(a.viz_dir).expanduser(), os.W_OK):
            raise SpecError(f"--viz-dir {a.viz_dir}: cannot be written")
    return a


def read_prompt(a):
    """The prompt given, or stdin's bytes for '-', as UTF-8 text."""
    if a.prompt != "-":
        return a.prompt
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError("the prompt on stdin is not valid UTF-8 text") from None


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    prompt = read_prompt(a)
    budget = tree.Budget(max_depth=a.max_depth, max_nodes_per_level=a.max_nodes_per_level,
                         max_total_nodes=a.max_total_nodes, max_time=a.max_time, branch=a.branch, prune=a.prune,
                         children=a.children)
    steps = []
    on_tree = (lambda t, path, new: steps.append((t, path, new))) if (a.viz or a.viz_dir) else None
    text, stats = speculative_decode(
        prompt, target=a.target, draft=a.draft, chat=not a.raw, device=a.device, dtype=getattr(torch, a.dtype),
        draft_quant=a.draft_quant, on_text=lambda s: print(s, end="", flush=True), mode=a.mode, max_new_tokens=a.max_new_tokens,
        k=a.k, tree_size=a.tree, verify=a.verify, lookup=a.lookup, budget=budget, on_tree=on_tree,
        temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    print()
    print(stats.line(), file=sys.stderr)
    if steps:
        tok = load_pair(a.target, None, a.device, getattr(torch, a.dtype))[0][1]
        if a.viz:
            tree.draw(*max(steps, key=lambda s: len(s[0].tokens)), tok, a.viz)
            print(f"[specdecode] wrote {a.viz}", file=sys.stderr)
        if a.viz_dir:
            print(f"[specdecode] wrote {tree.draw_all(steps, tok, a.viz_dir)}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except SpecdecodeError as e:
        print(f"specdecode: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\nspecdecode: interrupted", file=sys.stderr)
        sys.exit(130)
