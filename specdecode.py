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
       a tree attention mask; verification walks down from the root and keeps the path it
       accepts (it may stop at an inner node), plus one token of the target's.

Verification is coupled by default (sampler.py): position t of the output races with
exponentials drawn from (seed, t), so every mode emits exactly the tokens `ar` samples with
the same seed; --verify rejection uses rejection sampling instead. How much to draft each
step is policy.py's to say.

A run keeps one list `tokens` (prompt + output). Every cache holds a prefix of it; a
forward feeds whatever the cache lacks, and rolling back is setting the cache length. The
target's pass over the prompt comes first (`prefill`), the same in every mode; every step
after it is speculative, or a plain step where the plan does not draft.
"""
import argparse
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":                 # Ctrl-C while torch loads (seconds): the same quiet end as later
    signal.signal(signal.SIGINT, lambda *_: (print("\nspecdecode: interrupted", file=sys.stderr), os._exit(130)))
import torch

import policy
import sampler
import tree
import weights
from linears import SpecdecodeError, say    # SpecdecodeError: every refusal's base class, what API users catch

DEFAULT_PROMPT = "Write a Python function that checks whether a number is prime, with a short docstring."


class SpecError(SpecdecodeError):
    """Bad options or input, said in one line."""


DRAFT_VOCAB = 32768        # FR-Spec's and EAGLE-3's draft vocabulary; Qwen's BPE ids follow merge order, so its
                           # lowest ids are its commonest merges (a guess for other tokenizers; measured in bench)
MIN_TEMPERATURE = 1e-6     # derived: logits of |x| <= 1e3 over it stay far inside float32 (3.4e38), so no NaN


# ---------------------------------------------------------------------------- the steps

@dataclass
class Step:
    """What one step did: the tokens it emitted, the tree the target checked (a chain is a
    tree of one node per level; no nodes: a plain step) and the accepted path through it."""
    tokens: list
    tree: "tree.Tree" = field(default_factory=tree.Tree)
    path: list = field(default_factory=list)
    seconds: float = math.nan       # its wall time, measured by generate (the policy prices what passes do not explain)
    prompt: bool = False            # the prompt's pass: timed for the policy (its share of the run), not a step


@dataclass
class Run:
    """What a run changes (the user's choices are Options): tokens, random streams, policy, stats."""
    tokens: list
    vocab: int
    generator: torch.Generator      # rejection sampling's random numbers
    races: sampler.Races            # the exponentials of each output position
    policy: object                  # policy.Auto or policy.Fixed
    stats: "Stats"


def feed(model, tokens, extra=(), last=1):
    """Run the model on what its cache lacks of `tokens`, then `extra`: the last `last` logits [1, last, V]."""
    new = tokens[model.length:] + list(extra)
    return model(torch.tensor([new]), last=last)


def ar_step(target, draft, run, opts):
    """One target forward, one token: position t races with E_t (sampler.Races), so a seed's
    sample is the same whichever mode produced the tokens before it."""
    logits = feed(target, run.tokens)[0, -1, :run.vocab]
    return Step([int(sampler.draw(opts.settings.probs(logits), run.races.at(len(run.tokens))[0]))])


def prefill(target, run, opts):
    """The target's pass over the prompt, the same in every mode: the first new token."""
    step = ar_step(target, None, run, opts)
    step.prompt = True
    return step


def chain_step(target, draft, run, opts):
    """Draft K tokens, verify K+1 positions in one target pass, accept what rejection sampling
    (or coupled verification) keeps; a plain step where the plan does not draft."""
    plan, prefix = run.policy.plan(lag=len(run.tokens) - draft.length), len(run.tokens)
    if not plan.drafts:
        return ar_step(target, draft, run, opts)
    # draft: one token at a time, each drawn by its position's race, no more than are still to come
    drafts, qs, q_drafts = [], [], []        # qs: the draft's distributions; q_drafts: q of each draft token
    room = max(1, opts.max_new_tokens - (prefix - run.stats.prompt_tokens) - 1)
    while len(drafts) < room and plan.more(q_drafts):
        logits = feed(draft, run.tokens + drafts)[0, -1, :run.vocab]
        q = opts.settings.probs(logits)
        e = run.races.at(prefix + len(drafts))[0] if opts.verify == "coupled" else \
            sampler.exponentials(run.vocab, generator=run.generator, device=target.device, one_hot=opts.greedy)
        drafts.append(int(sampler.draw(q, e)))
        qs.append(q)
        q_drafts.append(float((q if opts.settings.temperature > 0 else tree.proposal(opts.settings, logits))[drafts[-1]]))
    # verify: ONE target pass over the K + 1 positions
    k, proposed = len(drafts), torch.tensor([drafts], device=target.device)
    p = opts.settings.probs(feed(target, run.tokens, drafts, last=k + 1)[:, :, :run.vocab])
    if opts.verify == "coupled":
        out, n = sampler.coupled_sample(p, proposed, run.races.at(prefix, k + 1)[None])
    else:
        u, e = sampler.random_inputs(1, k, run.vocab, run.generator, target.device, one_hot=opts.greedy)
        out, n = sampler.rejection_sample(p, torch.stack(qs)[None], proposed, u, e)
    # accept: n draft tokens and the target's own; both caches roll back to them
    n = int(n)
    target.truncate(prefix + n)
    draft.truncate(min(draft.length, prefix + n))
    return Step(out[0, :n + 1].tolist(), tree.Tree.of_chain(drafts, q_drafts), list(range(1, n + 1)))


def tree_step(target, draft, run, opts):
    """Grow a token tree with the draft, verify it in one target pass, keep the accepted path."""
    tokens, prefix = run.tokens, len(run.tokens)
    guess, match = tree.continuation(tokens) if opts.lookup == "auto" else ([], 0)
    g = tree.Growth(opts.settings, opts.budget, run.vocab, run.generator,
                    run.races if opts.verify == "coupled" else None, prefix, guess)
    t = tree.grow(draft, tokens, run.policy.plan(guess, match, len(tokens) - draft.length), g)
    p = opts.settings.probs(tree.score(target, tokens, t)[0, :, :run.vocab])
    if opts.verify == "coupled":
        path, new = tree.verify_coupled(t, p, run.races.at(prefix, max(t.depths) + 1))
    else:
        path, new = tree.verify(t, p, run.generator, one_hot=opts.greedy)
    for model in (target, draft):                    # both caches keep the prefix and the accepted path's nodes
        model.compact(prefix, [prefix - 1 + i for i in path])
    return Step([t.tokens[i] for i in path] + [new], t, path)


STEPS = {"ar": ar_step, "chain": chain_step, "tree": tree_step}


# ---------------------------------------------------------------------------- generate

def generate(prompt_ids, target, draft, opts: "Options", on_tokens=None):
    """Generate up to opts.max_new_tokens after prompt_ids. target/draft: (model, tokenizer).
    Returns (new token ids, Stats)."""
    run = new_run(prompt_ids, target, draft, opts)
    model, draft, stats, out = target[0], draft and draft[0], run.stats, []
    t0 = time.perf_counter()
    step = prefill(model, run, opts)
    step.seconds = stats.ttft = time.perf_counter() - t0
    stats.target_passes = 1
    run.policy.observe(step)                         # (its time counts in the run's, for tries' budget)
    while True:
        run.tokens.extend(step.tokens)
        stop = next((i for i, x in enumerate(step.tokens) if x in target[1].stop_ids), None)
        out += step.tokens[:stop][:opts.max_new_tokens - len(out)]
        if on_tokens:
            on_tokens(out)
        if stop is not None or len(out) == opts.max_new_tokens:
            break
        began = time.perf_counter()
        step = STEPS[opts.mode](model, draft, run, opts)
        step.seconds = time.perf_counter() - began
        run.policy.observe(step)
        stats.record(step)
        if opts.on_tree and opts.mode == "tree":
            opts.on_tree(step.tree, step.path, step.tokens[-1])
    stats.seconds, stats.new_tokens = time.perf_counter() - t0, len(out)
    return out, stats


def new_run(prompt_ids, target, draft, opts: "Options"):
    """Check the request against the models, make its caches (and, for an auto mode, its policy), and its Run."""
    model, tok = target
    if not prompt_ids:
        raise SpecError("no prompt token ids")
    if opts.mode != "ar" and draft is None:
        raise SpecError(f"--mode {opts.mode} needs a draft model")
    vocab = max(tok.vocab().values()) + 1
    bad = [i for i in prompt_ids if not (whole(i) and 0 <= i < min(vocab, model.config.vocab_size))]
    if bad:
        raise SpecError(f"the prompt's token ids must be whole numbers in [0, {vocab}), got {bad[0]!r}")
    models = [model] + ([draft[0]] if draft else [])
    need, context = len(prompt_ids) + opts.max_new_tokens, min(m.config.max_seq_len for m in models)
    if need + 1 > context:
        raise SpecError(f"the prompt ({len(prompt_ids)} tokens) plus --max-new-tokens {opts.max_new_tokens} "
                        f"exceed the model's context of {context} tokens")
    if need + opts.headroom > context:
        widest = {"chain": f"--k {opts.k}", "tree": f"--max-total-nodes {opts.budget.max_total_nodes}"}[opts.mode]
        raise SpecError(f"{widest}: a step's widest pass ({opts.headroom} tokens) does not fit the model's context "
                        f"of {context} after the prompt ({len(prompt_ids)} tokens) and --max-new-tokens "
                        f"{opts.max_new_tokens}")
    chooser = policy.Fixed(opts.k) if not opts.auto else \
        policy.Auto(policy.costs(model, "target"), policy.costs(draft[0], "draft"), opts.max_new_tokens)
    for m in models:
        m.setup_cache(need + opts.headroom)
    if draft is not None:                   # the draft proposes from its commonest tokens, the prompt's, and the stops
        draft[0].restrict_head([*range(DRAFT_VOCAB), *prompt_ids, *tok.stop_ids])
    return Run(list(prompt_ids), vocab,
               torch.Generator(device=model.device).manual_seed(opts.settings.seed),
               sampler.Races(opts.settings.seed, vocab, model.device, one_hot=opts.greedy), chooser,
               Stats(mode=opts.mode, prompt_tokens=len(prompt_ids)))


# ---------------------------------------------------------------------------- options and stats

def whole(x):
    return isinstance(x, int) and not isinstance(x, bool)


def finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class Settings:
    """How tokens are sampled (the same for every mode); checked when made."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not finite(self.temperature) or self.temperature < 0:
            raise SpecError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise SpecError(f"temperature {self.temperature!r} is too small to sample with in float32 (logits / T "
                            f"overflow): use 0 for greedy, or at least {MIN_TEMPERATURE}")
        if not whole(self.top_k) or self.top_k < 0:
            raise SpecError(f"top-k must be a whole number >= 0 (0 = off), got {self.top_k!r}")
        if not finite(self.top_p) or not 0 < self.top_p <= 1:
            raise SpecError(f"top-p must lie in (0, 1], got {self.top_p!r}")
        if not whole(self.seed) or not 0 <= self.seed < 2 ** 63:
            raise SpecError(f"seed must be a whole number in [0, 2^63), got {self.seed!r}")

    def probs(self, logits):
        return sampler.probs(logits, self.temperature, self.top_k, self.top_p)


@dataclass
class Options:
    """The user's choices for one generate() call, checked when made; generate never writes them."""
    mode: str = "tree"
    settings: Settings = field(default_factory=Settings)
    max_new_tokens: int = 128
    k: object = "auto"                      # chain: int or "auto"
    budget: tree.Budget = field(default_factory=tree.Budget)
    sizing: str = "auto"                    # trees: "auto" (policy.Auto) or "fixed" (fill the budgets)
    verify: str = "coupled"                 # "coupled" (a seed reproduces ar's sample) or "rejection"
    lookup: str = "auto"                    # tree: "auto" (lookup candidates where they pay) or "off"
    on_tree: object = None                  # callback(tree, accepted path, emitted token) per tree step

    @property
    def greedy(self):
        return self.settings.temperature == 0

    @property
    def auto(self):
        return (self.mode == "chain" and self.k == "auto") or (self.mode == "tree" and self.sizing == "auto")

    @property
    def headroom(self):
        """Cache slots one step may add beyond the output: its widest pass (a chain never drafts
        more than the tokens still to come)."""
        k = min(policy.K_MAX if self.k == "auto" else self.k, self.max_new_tokens)
        return {"ar": 1, "chain": k + 1, "tree": self.budget.max_total_nodes + 1}[self.mode]

    def __post_init__(self):
        """Refuse options that make no sense, before any model loads; one line each."""
        if self.mode not in STEPS:
            raise SpecError(f"mode must be one of {', '.join(STEPS)}, got {self.mode!r}")
        if not isinstance(self.settings, Settings):
            raise SpecError(f"settings must be a specdecode.Settings, got {self.settings!r}")
        if not whole(self.max_new_tokens) or self.max_new_tokens < 1:
            raise SpecError(f"max-new-tokens must be a whole number >= 1, got {self.max_new_tokens!r}")
        if self.k != "auto" and (not whole(self.k) or self.k < 1):
            raise SpecError(f"--k must be a whole number >= 1 or 'auto', got {self.k!r}")
        for name, value, allowed in (("sizing (--tree)", self.sizing, ("auto", "fixed")),
                                     ("lookup", self.lookup, ("auto", "off")),
                                     ("verify", self.verify, ("coupled", "rejection"))):
            if value not in allowed:
                raise SpecError(f"{name} must be {' or '.join(map(repr, allowed))}, got {value!r}")
        check_budget(self.budget)


def check_budget(b):
    if not isinstance(b, tree.Budget):
        raise SpecError(f"budget must be a tree.Budget, got {b!r}")
    for name in ("max_depth", "max_nodes_per_level", "max_total_nodes", "branch"):
        if not whole(getattr(b, name)) or getattr(b, name) < 1:
            raise SpecError(f"{name.replace('_', '-')} must be a whole number >= 1, got {getattr(b, name)!r}")
    if b.branch > sampler.MAX_CANDIDATES - 1:            # a node's candidates: its branch, and a lookup token
        raise SpecError(f"branch must be at most {sampler.MAX_CANDIDATES - 1} (a node's candidates and a lookup "
                        f"token fill the {sampler.MAX_CANDIDATES} the tree sampler takes)")
    if not finite(b.max_time) or b.max_time <= 0:
        raise SpecError(f"max-time must be a finite number of seconds > 0, got {b.max_time!r}")
    if b.prune not in ("best", "random") or b.children not in ("auto", "top-k", "sample"):
        raise SpecError(f"prune must be best|random and children auto|top-k|sample, got {b.prune!r}, {b.children!r}")


@dataclass
class Stats:
    mode: str = "ar"
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft: float = 0.0            # seconds to the first new token (the prompt's pass)
    seconds: float = 0.0
    target_passes: int = 0       # the prompt's, then one a step
    draft_passes: int = 0
    from_lookup: int = 0         # tree: accepted tokens only the lookup proposed
    plain_steps: int = 0         # steps with no draft forward
    drafted_per_step: list = field(default_factory=list)    # tokens the target checked: K (chain), nodes (tree)
    accepted_per_step: list = field(default_factory=list)   # draft tokens the target kept (a tree's accepted depth)

    def record(self, step):                      # a step after the prompt's pass
        t = step.tree
        self.target_passes += 1
        self.draft_passes += t.levels
        self.from_lookup += sum(t.sources[i] == "lookup" for i in step.path)
        self.plain_steps += not t.levels
        self.drafted_per_step.append(len(t.tokens) - 1)
        self.accepted_per_step.append(len(step.path))

    drafted = property(lambda self: sum(self.drafted_per_step))
    accepted = property(lambda self: sum(self.accepted_per_step))

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
        mean = lambda xs: sum(xs) / max(1, len(xs))
        s = (f"{self.mode}: prompt {self.prompt_tokens} tokens, {self.new_tokens} new, "
             f"first token {self.ttft:.2f} s, {self.tokens_per_second:.2f} tokens/s")
        if self.mode != "ar":
            s += (f", {self.target_passes} target passes, {self.tokens_per_pass:.2f} tokens/pass, "
                  f"{self.draft_passes} draft passes, acceptance {self.acceptance:.2f}")
        if self.mode == "tree":
            s += (f", mean tree {mean(self.drafted_per_step):.1f} nodes, mean accepted depth "
                  f"{mean(self.accepted_per_step):.2f}, accepted from lookup {self.from_lookup} / "
                  f"from the draft {self.accepted - self.from_lookup}")
        if self.mode == "chain" and self.drafted_per_step:
            s += f", mean K {mean(self.drafted_per_step):.1f}"
        if self.mode != "ar" and self.plain_steps:
            s += f", steps without the draft {self.plain_steps}"
        return s


# ---------------------------------------------------------------------------- the Python API

QUANTS = ("auto", "none", "int4")
_loaded = {}


def load_pair(target, draft=None, device="cpu", dtype=torch.bfloat16, quant="auto"):
    """(model, tokenizer) for target and draft (names or folders), loaded once per process.
    quant (model.Transformer.from_dir): "auto" runs a folder's quantized blocks where it has
    them (the demo models: their GGUF blocks, a third of the bytes), a draft's 8-bit ones
    rounded to 4 bits (a draft only proposes: measured, a quarter less time a pass and the same
    acceptance), "none" dense weights, "int4" also rounds dense linears to 4 bits (lossy)."""
    pair = []
    for role, name in (("target", target), ("draft", draft)):
        if name is None:
            pair.append(None)
            continue
        how = "draft" if role == "draft" and quant == "auto" else quant     # its 8-bit blocks at 4 bits
        key = (role, str(name), str(device), dtype, how)      # a draft equal to the target has its own cache
        if key not in _loaded:
            _loaded[key] = weights.load(name, device=device, dtype=dtype, quant=how)
        pair.append(_loaded[key])
    if pair[1] is not None and pair[0][1].vocab() != pair[1][1].vocab():      # decided by the vocabularies
        raise SpecError("the draft and target models use different tokenizers: pick a draft of the target's family")
    return pair


def speculative_decode(prompt, target=weights.DEMO_TARGET, draft=weights.DEMO_DRAFT, chat=True,
                       device="cpu", dtype=torch.bfloat16, quant="auto", on_text=None, **options):
    """Python entry point: text and Stats for a prompt. `options` are Options fields
    (mode, max_new_tokens, k, sizing, budget, verify, lookup, on_tree) and Settings fields
    (temperature, top_k, top_p, seed). Everything is checked before a model loads."""
    setting_names, option_names = set(Settings.__dataclass_fields__), set(Options.__dataclass_fields__)
    unknown = set(options) - setting_names - option_names
    if unknown:
        raise SpecError(f"unknown option(s): {', '.join(sorted(unknown))}")
    settings = Settings(**{k: v for k, v in options.items() if k in setting_names})
    opts = Options(settings=settings, **{k: v for k, v in options.items() if k not in setting_names})
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise SpecError(f"unknown device {device!r} (try cpu or cuda)") from None
    if kind not in ("cpu", "cuda") or kind == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"device {device!r}: specdecode runs on cpu or cuda, and this machine has "
                        f"{'a' if torch.cuda.is_available() else 'no'} CUDA device")
    if quant not in QUANTS:
        raise SpecError(f"quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise SpecError("the prompt is empty" if isinstance(prompt, str) else "the prompt must be text")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise SpecError("the prompt is not valid UTF-8 text") from None
    target, draft = load_pair(target, draft if opts.mode != "ar" else None, device, dtype, quant)
    tok = target[1]
    ids = tok.encode(tok.chat(prompt) if chat and tok.chat_template else prompt)
    stream = Stream(tok, on_text) if on_text else None
    out, stats = generate(ids, target, draft, opts, stream)
    return tok.decode(out), stats


def enhanced_speculative_decode(prompt, max_tokens=13, max_nodes_per_level=25, max_total_nodes=200, max_time=10):
    """The call of the tree paper ("Tree-Based Speculative Decoding with Adaptive Branching for
    Automated GPU Kernel Generation"): tree decoding with its budgets on the demo pair; the text."""
    budget = tree.Budget(max_nodes_per_level=max_nodes_per_level, max_total_nodes=max_total_nodes, max_time=max_time)
    text, _ = speculative_decode(prompt, mode="tree", sizing="fixed", budget=budget, max_new_tokens=max_tokens)
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


# ---------------------------------------------------------------------------- the command line

PICTURES = (".png", ".svg", ".pdf")        # what --viz writes (matplotlib's formats by name)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise SpecError(message)


def parser():
    ap = Parser(description="Speculative decoding (autoregressive, chain, tree) for Llama/Qwen models.")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt; '-' reads stdin")
    ap.add_argument("--mode", choices=STEPS, default="tree",
                    help="default: tree with --tree auto, the fastest mode bench.py measured on the demo pair")
    ap.add_argument("--target", default=weights.DEMO_TARGET, help="HuggingFace folder or demo name")
    ap.add_argument("--draft", default=weights.DEMO_DRAFT, help="HuggingFace folder or demo name")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--raw", action="store_true", help="do not apply the chat template")
    ap.add_argument("--k", default="auto", help="chain: draft tokens per step, or 'auto'")
    ap.add_argument("--tree", choices=("auto", "fixed"), default="auto",
                    help="tree: size each tree from measured costs (auto) or fill the budgets (fixed)")
    ap.add_argument("--max-depth", type=int, default=tree.Budget.max_depth)
    ap.add_argument("--max-nodes-per-level", type=int, default=tree.Budget.max_nodes_per_level)
    ap.add_argument("--max-total-nodes", type=int, default=tree.Budget.max_total_nodes)
    ap.add_argument("--max-time", type=float, default=tree.Budget.max_time, help="seconds to grow one tree")
    ap.add_argument("--branch", type=int, default=tree.Budget.branch, help="tree: children per expanded node")
    ap.add_argument("--prune", choices=("best", "random"), default="best")
    ap.add_argument("--verify", choices=("coupled", "rejection"), default="coupled",
                    help="coupled: position t races with exponentials from (seed, t), so a seed gives ar's text in "
                         "every mode; rejection: rejection sampling (accepts slightly more, text varies with the draft)")
    ap.add_argument("--lookup", choices=("auto", "off"), default="auto",
                    help="tree: also propose what followed the last few tokens where they occurred before in the "
                         "prompt or output, at no draft cost, where the policy expects gain (editing)")
    ap.add_argument("--children", choices=("auto", "top-k", "sample"), default="auto",
                    help="tree, --verify rejection: top-k candidates or i.i.d. draws (auto: draws when temperature > 0)")
    ap.add_argument("--viz", metavar="PNG", help="tree: draw the step with the most nodes")
    ap.add_argument("--viz-dir", metavar="DIR", help="tree: one PNG per step and an animated GIF")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    ap.add_argument("--quant", choices=QUANTS, default="auto",
                    help="auto: a folder's quantized blocks where it has them (the demo models: exact, a third of "
                         "the bytes), none: dense weights, int4: also round dense linears to 4 bits (lossy)")
    return ap


def parse_args(argv):
    """The flags (the command line's own checks; speculative_decode checks the rest before any model loads)."""
    a = parser().parse_args(argv)
    a.k = int(a.k) if a.k.lstrip("-").isdigit() else a.k          # (Options refuses what is neither)
    if (a.viz or a.viz_dir) and a.mode != "tree":
        raise SpecError("--viz and --viz-dir draw token trees: use them with --mode tree")
    if a.viz:
        viz = Path(a.viz).expanduser()
        if viz.is_dir():
            raise SpecError(f"--viz {a.viz} is a folder: give a file name (e.g. tree.png), or use --viz-dir")
        if viz.suffix.lower() not in PICTURES:
            raise SpecError(f"--viz {a.viz}: the picture's name must end in {', '.join(PICTURES)}")
        if not os.access(viz.resolve().parent, os.W_OK):               # said now, not after the run
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
        quant=a.quant, on_text=lambda s: print(s, end="", flush=True), mode=a.mode, max_new_tokens=a.max_new_tokens,
        k=a.k, sizing=a.tree, verify=a.verify, lookup=a.lookup, budget=budget, on_tree=on_tree,
        temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    print()
    print(stats.line(), file=sys.stderr)
    tok = load_pair(a.target, None, a.device, getattr(torch, a.dtype), a.quant)[0][1]
    if a.viz and steps:
        tree.render(*max(steps, key=lambda s: len(s[0].tokens)), tok, a.viz)
        say(f"wrote {a.viz}")
    if a.viz_dir and steps:
        say(f"wrote {tree.render_all(steps, tok, a.viz_dir)}")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)   # from here on KeyboardInterrupt, caught below
    try:
        main()
    except SpecdecodeError as e:
        print(f"specdecode: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\nspecdecode: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:                  # the reader left (| head): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # (no second error at exit's flush)
        sys.exit(141)                        # 128 + SIGPIPE, the status of a tool the pipe ended
