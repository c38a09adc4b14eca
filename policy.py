"""When and how much to draft: what a pass costs, how likely a draft token is accepted, and
the plan of each step that maximises expected tokens per second. It only measures and
decides; the tokens emitted never depend on it (verification keeps them exact).

Cost. Once per loaded model, its forward is timed at WIDTHS new tokens (best of three), and
`Costs.seconds(n)` interpolates that table, each width corrected by the median ratio of the
passes seen since (the model times each forward; on the CPU the policy reads those times
after each step, `Costs.refit`) to what the table said: a table timed during a burst of
load, or a machine that gets busier or quieter, is refit by the passes themselves, and a
width never seen takes the correction of the nearest one seen.

Acceptance. Once its parent is accepted, a draft token x at depth d with draft
probability q(x) is accepted with probability about min(1, c_d q(x)), where c_d is this
run's accepted tokens over the sum of q over the tokens the target judged at that depth
(`Acceptance`). A node's value v is the product of that along its path: P(node accepted).
A lookup token below the draft's tree has no q: a run of j of them is accepted with
E[r^j] under a Beta belief about their rate r, kept per match length (`LookupRates`).

Plan. A step is expected to give E = 1 + sum of its nodes' values, in the time of its
draft passes plus one target pass over its N nodes and the root. Each tree level keeps
the m best candidates that maximise E / time, and the draft goes on while that rate is
expected to rise within K_MAX more levels; a chain drafts on the same rule. A run of
lookup tokens hangs as many as pay. Whether to draft at all is the same rule at size
zero: the draft's recent steps (their tokens over their priced time) against a plain
step (one token, one one-token pass) and a lookup run from the root. A drafted step also
costs what its passes do not explain (growing and verifying a tree: measured, `Auto.extra`).
The first try, and each later one of a draft that lost (ever less often), is made only while
the tries would lose at most EXPLORE of the run's time (its seconds so far, the prompt's pass
included, and plain steps for the tokens it may still emit), this one's catch-up included:
its first draft pass is over every token the draft has not seen (the whole prompt, at first).
"""
import bisect
import math
import statistics
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from itertools import accumulate

import torch

import tree
from linears import say

WIDTHS = (1, 2, 4, 8, 16, 32)     # the widths of the passes a step makes: a draft step, a chain, a tree
K_MAX = 12                        # a guess: the longest chain --k auto drafts (and the cache headroom it needs)
RECENT = 8                        # a guess: drafted steps the draft is judged on (a few steps' noise averages out),
                                  # and steps without it before it is tried again (then twice as many, up to 8x)
EXPLORE = 0.1                     # a guess: the share of a run's time that tries of a losing draft may lose
DECAY = 0.9                       # a guess: each step weighs the acceptance counts before it by this (~10 steps count)
DEEPEST = tree.Budget.max_depth   # acceptance is counted per depth up to the default --max-depth; deeper share it


@dataclass
class Costs:
    """Seconds of one forward over n new tokens, from a table measured at `widths`, refit by
    the passes observed since."""
    widths: tuple
    times: tuple
    log: deque = None                            # the model's latest passes (Transformer.passes); None: not refit
    seen: dict = field(default_factory=dict)     # table index -> recent (observed / table) ratios
    fit: tuple = None                            # fitted(), until the next observation

    def seconds(self, n, times=None):
        """Linear between the widths of the table (as refit, or `times`), the last segment continued past them."""
        if times is None:
            self.fit = times = self.fit or self.fitted()
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

    def refit(self):
        """Observe the passes in the model's log since the last refit (a step's: after a prompt's
        pass, at most max(widths) wide), and fit the table to them: between steps, not in one."""
        while self.log:
            start, n, seconds = self.log.popleft()
            if start > 0 and n <= self.widths[-1]:
                self.observe(n, seconds)
        self.fit = self.fit or self.fitted()

    def observe(self, n, seconds):
        """A pass over n new tokens took `seconds`: kept (the last RECENT) at the nearest width."""
        i = min(range(len(self.widths)), key=lambda j: abs(self.widths[j] - n))
        ratios = self.seen.setdefault(i, [])
        ratios.append(seconds / self.seconds(n, self.times))
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
        model.passes.clear()                                     # (the table's own passes are no observations)
        cpu = model.device.type == "cpu"                         # (a GPU's forward returns before it is done)
        _measured[model] = Costs(WIDTHS, tuple(times), model.passes if cpu else None)
        ms = "/".join(f"{s * 1e3:.0f}" for s in times)
        say(f"{name} forward at {'/'.join(map(str, WIDTHS))} tokens: {ms} ms (timed once, {time.perf_counter() - t:.1f} s)")
    return _measured[model]


class Acceptance:
    """c_d per depth d (depths past DEEPEST share one): accepted tokens over the summed q of
    the tokens judged, each step weighing the past by DECAY, from a prior worth one token
    that trusts q (c = 1)."""

    def __init__(self):
        self.counts = {}                             # depth -> [accepted, summed q]

    def c(self, depth):
        a, s = self.counts.get(min(depth, DEEPEST), (1.0, 1.0))
        return a / s

    def observe(self, t, path):
        if len(t.tokens) == 1:
            return
        for d in self.counts.values():
            d[0], d[1] = DECAY * d[0], DECAY * d[1]
        accepted = set(path)
        for i in t.reached(path):
            if not math.isnan(t.q[i]):
                d = self.counts.setdefault(min(t.depths[i], DEEPEST), [1.0, 1.0])
                d[0], d[1] = d[0] + (i in accepted), d[1] + t.q[i]


class LookupRates:
    """Per match length (2, 3, or 4 and more): lookup tokens accepted and judged, each step
    weighing the past by DECAY, from a prior worth one token and weighted near 0 and 1 (a
    lookup mostly either copies a file or guesses), its mean growing with the match: a guess,
    Beta(1/4, 3/4) for 2 tokens, Beta(1/2, 1/2) for 3, Beta(3/4, 1/4) for 4 and more. A long
    match in an edited file is nearly always right, a short one in fresh text mostly chance."""

    def __init__(self):
        self.counts = {2: [0.25, 1.0], 3: [0.5, 1.0], 4: [0.75, 1.0]}

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
        c[0], c[1] = DECAY * c[0], DECAY * c[1]
        for i in t.reached(path):
            if t.sources[i] != "draft":
                c[0], c[1] = c[0] + (i in accepted), c[1] + 1


class Fixed:
    """--tree fixed and --k N: every step fills the budgets (as the tree paper does) or drafts
    K; the plan of every step is this object (tree.Plan)."""
    drafts = True

    def __init__(self, k=None):
        self.k = k

    def plan(self, guess=(), match=0, lag=1):
        return self

    def observe(self, step):
        pass

    def level(self, t, parents, q):
        return [math.nan] * len(q), len(q), True       # not valued: the budgets decide

    def lookup(self, t, tip, room):
        return room

    def more(self, q):
        return len(q) < self.k


class Auto:
    """--tree auto and --k auto: plans that maximise expected tokens per second (module docstring)."""

    def __init__(self, target: Costs, draft: Costs, ahead=0):
        self.target, self.draft, self.ahead = target, draft, ahead          # ahead: tokens the run may still emit
        self.acceptance, self.lookups, self.match = Acceptance(), LookupRates(), 0
        self.recent, self.idle, self.patience = [], 0, RECENT    # drafted steps' (tokens, tree); since; before a try
        self.trying, self.lost, self.elapsed = False, 0.0, 0.0     # this step is a try; tries' loss; the run's seconds
        self.catch_up = 0.0                                          # this step's first draft pass over a one-token one
        self.beyond, self.extra = {True: deque(maxlen=RECENT), False: deque(maxlen=RECENT)}, 0.0  # drafted? -> s beyond

    def plan(self, guess=(), match=0, lag=1):
        """This step's plan: draft, or not (a plain step, or the lookup run alone). lag: the
        tokens the draft's first pass would take (1 when it has seen all but the root)."""
        self.match = match
        runs = self.lookups.runs(match, len(guess)) if guess else []
        lookups = AutoPlan(self, runs, False)                # the lookup run from the root, without the draft
        _, alone = lookups.best(lookups.grown(tree.Tree()), runs)
        drafted = sum(n for n, _ in self.recent) / sum(self.price(t) for _, t in self.recent) if self.recent else 0.0
        wins = drafted > alone                               # alone: at least a plain step's 1 / seconds(1)
        self.catch_up = self.draft.seconds(lag) - self.draft.seconds(1)
        run = self.elapsed + self.ahead * self.target.seconds(1)            # the run's seconds, as far as known
        tries = (not self.recent or self.idle >= self.patience) and self.lost + self.catch_up <= EXPLORE * run
        drafts = wins or tries                               # a draft that lost is tried again, ever less often
        self.patience = RECENT if wins else min(2 * self.patience, 8 * RECENT) if tries and self.recent else self.patience
        self.idle = 0 if drafts else self.idle + 1
        self.trying = tries and not wins                     # what it loses is counted in `lost`
        return AutoPlan(self, runs, drafts)

    def draft_seconds(self, t, extra=True):
        """Priced seconds of a tree's drafting so far: its draft passes (the root's, then each fed
        level's width), and `extra`, what a drafted step takes beyond its passes more than a plain one."""
        widths = [t.depths.count(d) for d in range(1, t.levels)]
        passes = self.draft.seconds(1) + sum(self.draft.seconds(w) for w in widths) if t.levels else 0.0
        return passes + (self.extra if extra and t.levels else 0.0)

    def price(self, t, extra=True):
        """Priced seconds of a step's tree: its drafting and the target pass over its nodes, the root's first."""
        return self.draft_seconds(t, extra) + self.target.seconds(len(t.tokens))

    def observe(self, step):
        for table in (self.target, self.draft):         # the step's passes, as the models timed them
            table.refit()
        self.elapsed += 0.0 if math.isnan(step.seconds) else step.seconds
        self.ahead = max(0, self.ahead - len(step.tokens))
        if step.prompt:                              # the prompt's pass: the run's first seconds, not a step
            return
        if not math.isnan(step.seconds):             # a try loses what it took beyond plain steps for its tokens
            self.lost += max(0.0, step.seconds - len(step.tokens) * self.target.seconds(1)) if self.trying else 0.0
            drafted = step.tree.levels > 0           # what its passes (and its catch-up, a cost of once) do not
                                                     # explain; medians of the last RECENT
            self.beyond[drafted].append(step.seconds - self.price(step.tree, extra=False) - drafted * self.catch_up)
            self.extra = max(0.0, statistics.median(self.beyond[True] or [0]) - statistics.median(self.beyond[False] or [0]))
        if step.tree.levels:
            self.recent = (self.recent + [(len(step.tokens), step.tree)])[-RECENT:]    # priced at today's costs
        self.acceptance.observe(step.tree, step.path)
        self.lookups.observe(step.tree, step.path, self.match)


@dataclass
class AutoPlan:
    """One step's plan under Auto (tree.Plan): a tree whose nodes (the root's first) have
    values v is expected to give E = sum(v) tokens (the root's 1: the target's own token) in
    its priced draft seconds plus a target pass over its nodes."""
    policy: Auto
    runs: list                     # P(the next j lookup tokens are all accepted), j = 1, 2, ... (LookupRates.runs)
    drafts: bool

    def grown(self, t):
        """(expected tokens, priced draft seconds, nodes) of tree t as grown so far."""
        return sum(v for v in t.values if not math.isnan(v)), self.policy.draft_seconds(t), len(t.tokens)

    def rate(self, expected, seconds, nodes):
        """Expected tokens per second: draft seconds, then a target pass over the nodes."""
        return expected / (seconds + self.policy.target.seconds(nodes))

    def level(self, t, parents, q):
        """Values v = v(parent) min(1, c_d q) at the children's depth d; keep the m best that
        maximise the expected rate, and draft below them if a run below the best one pays."""
        c = self.policy.acceptance.c
        values = [t.values[f] * min(1.0, c(t.depths[f] + 1) * qx) for f, qx in zip(parents, q)]
        grown = expected, seconds, n = self.grown(t)
        m, _ = self.best(grown, values)
        if m == 0:
            return values, 0, False
        best = max(range(m), key=values.__getitem__)
        rho = min(1.0, c(t.depths[parents[best]] + 2) * q[best])
        return values, m, self.pays(expected + sum(values[:m]), seconds, n + m, values[best], rho, m)

    def best(self, grown, values):
        """(m, rate): the m first of `values` (new nodes' values, best first) that, added to a
        tree grown so far (`grown`), give the highest expected rate, each one more node in the
        target's pass; and that rate."""
        expected, seconds, n = grown
        rates = [self.rate(expected + gain, seconds, n + m) for m, gain in enumerate(accumulate(values, initial=0.0))]
        m = max(range(len(rates)), key=lambda m: (rates[m], -m))
        return m, rates[m]

    def pays(self, expected, seconds, nodes, v, rho, width):
        """Whether drafting on pays within K_MAX more levels (the next a pass over `width` new
        nodes, the later ones one node each, the j-th accepted with probability v rho^j): a
        level alone can lose where the run it starts pays, for a confident draft is accepted in runs."""
        now, draft = self.rate(expected, seconds, nodes), self.policy.draft
        for _ in range(K_MAX):
            v *= rho
            expected, seconds, nodes, width = expected + v, seconds + draft.seconds(width), nodes + width, 1
            if self.rate(expected, seconds, nodes) > now:
                return True
        return False

    def lookup(self, t, tip, room):
        """The lookup run below node tip: its j-th token accepted with v(tip) runs[j - 1]."""
        return self.best(self.grown(t), [t.values[tip] * run for run in self.runs[:room]])[0]

    def more(self, q):
        """Chain: whether to draft token len(q) + 1 (values v_i = v_{i-1} min(1, c_i q_i))."""
        k, v, values = len(q), 1.0, []
        if k == 0 or k >= K_MAX:
            return k == 0
        for i, qi in enumerate(q, 1):
            v *= min(1.0, self.policy.acceptance.c(i) * qi)
            values.append(v)
        rho = min(1.0, self.policy.acceptance.c(k + 1) * q[-1])
        return self.pays(1 + sum(values), k * self.policy.draft.seconds(1), k + 1, v, rho, 1)
