"""When and how much to draft: what a pass costs, how likely a draft token is accepted, and
the plan of each step that maximises expected tokens per second. It only measures and
decides; the tokens emitted never depend on it (verification keeps them exact).

Cost. Once per loaded model, its forward is timed at WIDTHS new tokens (best of three), and
`Costs.seconds(n)` interpolates that table, each width corrected by the median ratio of the
passes seen since (every forward on the CPU is timed) to what the table said: a table timed
during a burst of load, or a machine that gets busier or quieter, is refit by the passes
themselves, and a width never seen takes the correction of the nearest one seen.

Acceptance. Once its parent is accepted, a draft token x at depth d with draft
probability q(x) is accepted with probability about min(1, c_d q(x)), where c_d is this
run's accepted tokens over the sum of q over the tokens the target judged at that depth
(`Acceptance`). A node's value v is the product of that along its path: P(node accepted).
A lookup token below the draft's tree has no q: a run of j of them is accepted with
E[r^j] under a Beta belief about their rate r, kept per match length (`LookupRates`).

Plan. A step is expected to give E = 1 + sum of its nodes' values, in the time of its
draft passes plus one target pass over its N nodes and the root. Each tree level keeps
the m best candidates that maximise E / time, and the draft goes on while that rate is
expected to rise within K_MAX more levels; a chain drafts on the same rule. A lookup
chain hangs as many tokens as pay. Whether to draft at all is the same rule at size
zero: the draft's recent steps (their tokens over their priced time) against a plain
step (one token, one one-token pass) and a lookup chain from the root.
"""
import bisect
import math
import statistics
import sys
import time
import weakref
from dataclasses import dataclass, field

import torch

from tree import ROOT

WIDTHS = (1, 2, 4, 8, 16, 32)     # the widths of the passes a step makes: a draft step, a chain, a tree
K_MAX = 12                        # a guess: the longest chain --k auto drafts (and the cache headroom it needs)
RECENT = 8                        # a guess: drafted steps the draft is judged on (a few steps' noise averages out),
                                  # and steps without it before it is tried again


@dataclass
class Costs:
    """Seconds of one forward over n new tokens, from a table measured at `widths`, refit by
    the passes observed since."""
    widths: tuple
    times: tuple
    seen: dict = field(default_factory=dict)     # table index -> recent (observed / table) ratios
    fit: tuple = None                            # fitted(), until the next observation

    def seconds(self, n):
        self.fit = self.fit or self.fitted()
        return self.interpolate(self.fit, n)

    def interpolate(self, times, n):
        """Linear between the widths, the last segment continued past them."""
        i = min(max(bisect.bisect_left(self.widths, n), 1), len(self.widths) - 1)
        (w0, w1), (t0, t1) = self.widths[i - 1:i + 1], times[i - 1:i + 1]
        return max(t0 + (t1 - t0) * (n - w0) / (w1 - w0), 1e-6)

    def fitted(self):
        """The table, each width times the median ratio seen at the nearest width that has one."""
        if not self.seen:
            return self.times
        ratio = {i: statistics.median(r) for i, r in self.seen.items()}
        nearest = lambda i: ratio[min(ratio, key=lambda j: (abs(j - i), j))]
        return tuple(t * nearest(i) for i, t in enumerate(self.times))

    def observe(self, n, seconds):
        """A pass over n new tokens took `seconds`: kept (the last RECENT) at the nearest width."""
        i = min(range(len(self.widths)), key=lambda j: abs(self.widths[j] - n))
        ratios = self.seen.setdefault(i, [])
        ratios.append(seconds / self.interpolate(self.times, n))
        del ratios[:-RECENT]
        self.fit = None


_measured = weakref.WeakKeyDictionary()          # model -> its Costs


def costs(model, name, rounds=3):
    """The model's Costs, timed on first use after a 32-token prompt: `rounds` rounds, each
    timing every width in turn, the best of each width kept, so that a burst of noise must
    hit one width in every round to count (one bad round once tripled a table here)."""
    if model not in _measured:
        t = time.perf_counter()
        prompt, most, times = 32, max(WIDTHS), [math.inf] * len(WIDTHS)
        ids = torch.arange(prompt + most, device=model.device)[None] % model.config.vocab_size
        model.setup_cache(prompt + most)
        model(ids[:, :prompt], last=1)
        for _ in range(rounds):
            for i, w in enumerate(WIDTHS):
                model.truncate(prompt)
                t0 = time.perf_counter()
                model(ids[:, prompt:prompt + w], last=w).sum().item()       # .item(): waits for a GPU
                times[i] = min(times[i], time.perf_counter() - t0)
        times = [min(times[i:]) for i in range(len(times))]      # a narrower pass is never dearer: noise
        _measured[model] = Costs(WIDTHS, tuple(times))
        if model.device.type == "cpu":                           # (a GPU's forward returns before it is done)
            watch(model, _measured[model])
        ms = "/".join(f"{s * 1e3:.0f}" for s in times)
        print(f"[specdecode] {name} forward at {'/'.join(map(str, WIDTHS))} tokens: {ms} ms "
              f"(timed once, {time.perf_counter() - t:.1f} s)", file=sys.stderr)
    return _measured[model]


def watch(model, costs):
    """Time every later forward of `model` after the prompt's (those up to max(WIDTHS) tokens
    wide) into costs.observe: hooks around the module's call, so no step needs to time itself."""
    began = {}

    def before(module, args):
        began["t"] = time.perf_counter() if 0 < module.length and args[0].shape[1] <= max(WIDTHS) else None

    def after(module, args, out):
        if began["t"] is not None:
            costs.observe(args[0].shape[1], time.perf_counter() - began["t"])

    model.register_forward_pre_hook(before)
    model.register_forward_hook(after)


class Acceptance:
    """c_d per depth d (depths past 8, the default --max-depth, share one): accepted tokens
    over the summed q of the tokens judged, each step weighing the past by 0.9 (a guess:
    about the last 10 steps count), from a prior worth one token that trusts q (c = 1)."""

    def __init__(self):
        self.counts = {}                             # depth -> [accepted, summed q]

    def c(self, depth):
        a, s = self.counts.get(min(depth, 8), (1.0, 1.0))
        return a / s

    def observe(self, t, path):
        if not t.tokens:
            return
        for d in self.counts.values():
            d[0], d[1] = 0.9 * d[0], 0.9 * d[1]
        accepted = set(path)
        for i in t.reached(path):
            if not math.isnan(t.q[i]):
                d = self.counts.setdefault(min(t.depths[i], 8), [1.0, 1.0])
                d[0], d[1] = d[0] + (i in accepted), d[1] + t.q[i]


class LookupRates:
    """Per match length (2, 3, or 4 and more): lookup tokens accepted and judged, each step
    weighing the past by 0.9, from a prior Beta(1/4, 3/4): worth one token, 1 in 4 accepted,
    and weighted near 0 and 1, for a lookup mostly either copies a file or guesses. A long
    match in an edited file is nearly always right, a short one in fresh text mostly chance."""

    def __init__(self):
        self.counts = {n: [0.25, 1.0] for n in (2, 3, 4)}

    def runs(self, match, most):
        """P(the next j lookup tokens are all accepted | the first one's parent was), j = 1..most:
        E[r^j] = prod_{i<j} (a + i) / (a + b + i) under Beta(a, b). Unlike E[r]^j it keeps the
        long runs of a file being copied: one accepted run makes the next one surer."""
        a, judged = self.counts[min(max(match, 2), 4)]
        p, out = 1.0, []
        for i in range(most):
            p *= (a + i) / (judged + i)
            out.append(p)
        return out

    def observe(self, t, path, match):
        if not match or all(s == "draft" for s in t.sources):
            return
        c, accepted = self.counts[min(match, 4)], set(path)
        c[0], c[1] = 0.9 * c[0], 0.9 * c[1]
        for i in t.reached(path):
            if t.sources[i] != "draft":
                c[0], c[1] = c[0] + (i in accepted), c[1] + 1


class Fixed:
    """--tree fixed and --k N: fill the budgets every step (the tree paper's), or draft K; each
    step's plan is this object, its clock for max_time restarted."""
    drafts = True

    def __init__(self, budget, k=None):
        self.budget, self.k, self.t0 = budget, k, 0.0

    def plan(self, guess=(), match=0):
        self.t0 = time.perf_counter()
        return self

    def observe(self, step):
        pass

    def keep(self, t, chosen):
        return len(chosen)

    def deeper(self, t, frontier):
        return time.perf_counter() - self.t0 < self.budget.max_time

    def chain(self, t, tip, room):
        return room

    def more(self, qs):
        return len(qs) < self.k


class Auto:
    """--tree auto and --k auto: plans that maximise expected tokens per second (module docstring)."""

    def __init__(self, target: Costs, draft: Costs):
        self.target, self.draft = target, draft
        self.acceptance, self.lookup, self.match = Acceptance(), LookupRates(), 0
        self.recent, self.idle = [], 0               # (tokens, tree) of the last drafted steps; steps since

    def plan(self, guess=(), match=0):
        """This step's plan: draft, or not (a plain step, or the lookup chain alone)."""
        self.match = match
        p = AutoPlan(self, self.lookup.runs(match, len(guess)) if guess else [])
        _, alone = p.best_chain(1.0, len(guess))
        drafting = sum(n for n, _ in self.recent) / sum(self.price(t) for _, t in self.recent) if self.recent else math.inf
        p.drafts = drafting > alone or self.idle >= RECENT     # alone: at least a plain step's 1 / seconds(1)
        self.idle = 0 if p.drafts else self.idle + 1             # a draft that lost is tried again now and then
        p.drafting = self.draft.seconds(1) if p.drafts else 0.0
        return p

    def price(self, t):
        """Priced seconds of a step's tree: its draft passes (the root, then each level's width)
        and the target pass over its nodes and the root."""
        widths = [t.depths.count(d) for d in range(1, t.levels)]
        drafting = self.draft.seconds(1) + sum(self.draft.seconds(w) for w in widths) if t.levels else 0.0
        return drafting + self.target.seconds(len(t.tokens) + 1)

    def observe(self, step):
        if step.tree.levels:
            self.recent = (self.recent + [(len(step.tokens), step.tree)])[-RECENT:]    # priced at today's costs
        self.acceptance.observe(step.tree, step.path)
        self.lookup.observe(step.tree, step.path, self.match)


class AutoPlan:
    """One step's growth under Auto: expected tokens so far (1 + the kept nodes' values),
    priced draft seconds so far, and each kept node's value."""

    def __init__(self, policy: Auto, runs):
        self.p, self.runs = policy, runs
        self.drafts, self.expected, self.drafting, self.values = False, 1.0, 0.0, {ROOT: 1.0}

    def rate(self, expected, drafting, nodes):
        return expected / (drafting + self.p.target.seconds(nodes + 1))

    def keep(self, t, chosen):
        """How many of the level's candidates (best first) maximise the expected rate."""
        if not chosen:
            return 0
        c = self.p.acceptance.c(t.depth(chosen[0][0]) + 1)
        vs = [self.values[f] * min(1.0, c * cand.q) for f, cand in chosen]
        n, e = len(t.tokens), self.expected
        best_m, best = 0, self.rate(e, self.drafting, n)
        for m, v in enumerate(vs, 1):
            e += v
            if self.rate(e, self.drafting, n + m) > best:
                best_m, best = m, self.rate(e, self.drafting, n + m)
        self.values.update((n + i, v) for i, v in enumerate(vs[:best_m]))   # t.add numbers them n, n + 1, ...
        self.expected += sum(vs[:best_m])
        return best_m

    def deeper(self, t, frontier):
        """Whether another draft pass pays, looking down from the best frontier node."""
        best = max(frontier, key=self.values.get)
        rho = min(1.0, self.p.acceptance.c(t.depths[best] + 1) * t.q[best])
        if not self.pays_on(self.expected, self.drafting, len(t.tokens), self.values[best], rho, len(frontier)):
            return False
        self.drafting += self.p.draft.seconds(len(frontier))
        return True

    def pays_on(self, expected, drafting, nodes, v, rho, width):
        """Whether drafting on pays within K_MAX more levels (the next a pass over `width` new
        nodes, the later ones one node each, the j-th accepted with probability v rho^j): a
        level alone can lose where the run it starts pays, for a confident draft is accepted in runs."""
        now = self.rate(expected, drafting, nodes)
        for _ in range(K_MAX):
            v *= rho
            expected, drafting, nodes, width = expected + v, drafting + self.p.draft.seconds(width), nodes + width, 1
            if self.rate(expected, drafting, nodes) > now:
                return True
        return False

    def best_chain(self, reach, room, nodes=0):
        """(j, rate): how many of `room` lookup tokens to hang below a node reached with
        probability `reach`, the j-th accepted with reach * runs[j - 1], each one more target token."""
        best_j, best, e = 0, self.rate(self.expected, self.drafting, nodes), self.expected
        for j, run in enumerate(self.runs[:room], 1):
            e += reach * run
            if self.rate(e, self.drafting, nodes + j) > best:
                best_j, best = j, self.rate(e, self.drafting, nodes + j)
        return best_j, best

    def chain(self, t, tip, room):
        return self.best_chain(self.values[tip], room, len(t.tokens))[0]

    def more(self, qs):
        """Chain: whether to draft token len(qs) + 1 (values v_i = v_{i-1} min(1, c_i q_i))."""
        k, v, vs = len(qs), 1.0, []
        if k == 0 or k >= K_MAX:
            return k == 0
        for i, q in enumerate(qs, 1):
            v *= min(1.0, self.p.acceptance.c(i) * q)
            vs.append(v)
        return self.pays_on(1 + sum(vs), k * self.p.draft.seconds(1), k, v, min(1.0, self.p.acceptance.c(k + 1) * qs[-1]), 1)
