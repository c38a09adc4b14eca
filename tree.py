"""The token tree: grow it with the draft, verify it with the target in one pass, draw it.

Grow (level by level, ONE draft forward per level over the whole frontier):
    each frontier node f has a draft distribution q_f; its candidates are the top `branch`
    tokens of q_f (greedy / point masses) or `branch` tokens drawn i.i.d. from q_f
    (sampling); a candidate c scores its cumulative log-probability
        logp(c) = logp(f) + log q_f(c)
    and the best-scoring candidates of the level are kept (or random ones, as in the tree
    paper), within max_nodes_per_level, max_total_nodes, max_depth and max_time. The rest
    are pruned: never fed to a model, but kept in the picture and in verification.
    Lookup (`Lookup`): the tokens that followed the latest earlier occurrence of the
    context's longest recurring suffix join the levels as point-mass candidates, and the rest of
    that continuation may hang below the tree as a chain no draft forward ever sees; or,
    where that pays better than the draft's trees have measured, the chain is the whole
    tree (a lookup-only step: no draft forward at all). With lookup, the draft is fed lazily:
    the prompt pass is the target's alone, and a draft that lacks many tokens (the prompt,
    or a long stretch the lookup carried) is left behind, the steps going on with the
    lookup's chain or none, until those steps have cost what catching it up would
    (`AutoSize.renting`, ski rental). An edited file may then never need the draft at all.
Score: ONE target forward over the root and every kept node, with a tree attention mask
    (a node sees the prefix, its ancestors and itself) and position = prefix length + depth.
Verify: walk down from the root. At each node, sampler.tree_sample runs SpecInfer's
    multi-round rejection over the node's candidates (kept or pruned) in the order they were
    made: an accepted kept child is descended into, an accepted pruned child ends the step,
    and if all are rejected a token is drawn from the target's residual. Every emitted token
    is therefore distributed exactly as the target's. Greedy: the child equal to the
    target's argmax is followed, else the argmax is emitted. Coupled (`verify_coupled`,
    sampler.py): the children are the best of the draft's race at their position, and the
    target's race winner is followed while it is a kept child, else emitted.
Compact: both KV caches keep the prefix and the accepted path, nothing else.

Auto sizing (`AutoSize`): the expected number of tokens a step yields is 1 + sum over kept
nodes of P(node accepted), estimated as exp(logp) times a calibration the run measures
(accepted depth / predicted depth). Time is the draft forwards (each a function of the
tokens it feeds) plus the target pass over N nodes, all measured on this machine. Each
level keeps the m best candidates maximising expected tokens per second, and the tree
goes one level deeper only while that rate is still expected to rise. The j-th token of a
lookup chain is expected with P(its start is reached) times P(a run of j lookup tokens is
accepted), which the lookup measures itself (`Lookup.runs`; not calibrated).
"""
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import sampler


@dataclass
class Budget:
    max_depth: int = 8
    max_nodes_per_level: int = 25
    max_total_nodes: int = 200
    max_time: float = 10.0         # seconds to grow one tree
    branch: int = 4                # candidates per expanded node
    prune: str = "best"            # "best" cumulative log-probabilities, or "random" (the paper)
    children: str = "auto"         # "top-k", "sample" (i.i.d. draws), or "auto": sample when temperature > 0


@dataclass
class Candidate:
    """A proposed child of a tree node. q: the draft's probability of the token given the
    parent (nan where the draft never saw the parent); logp: its cumulative log-probability,
    the score levels are sized by; point: proposed deterministically (a top-k or race pick,
    a lookup token) rather than drawn from the parent's q; source: "draft", "lookup" or
    "both"; node: the kept node it became (-1: pruned)."""
    token: int
    q: float
    logp: float
    point: bool = True
    source: str = "draft"
    node: int = -1


@dataclass
class Tree:
    """Kept nodes 0..N-1 in level order (their KV slots follow the prefix in this order)."""
    tokens: list = field(default_factory=list)
    parents: list = field(default_factory=list)     # -1 = the root (the last prefix token)
    depths: list = field(default_factory=list)
    q: list = field(default_factory=list)           # draft probability of the node's token
    logp: list = field(default_factory=list)        # cumulative log-probability (sizing score)
    sources: list = field(default_factory=list)     # "draft", "lookup" or "both"
    candidates: dict = field(default_factory=dict)  # node (-1 = the root) -> [Candidate], in the order made
    dists: dict = field(default_factory=dict)       # node -> q_f its drawn candidates came from
    levels: int = 0                                  # draft forwards spent growing

    def depth(self, node):
        return self.depths[node] if node >= 0 else 0

    def ancestors(self):
        """[N, N] bool: entry (i, j) says j is i or an ancestor of i."""
        n = len(self.tokens)
        anc = torch.eye(n, dtype=torch.bool)
        for i, par in enumerate(self.parents):
            if par >= 0:
                anc[i] |= anc[par]
        return anc

    def add(self, parent, c: Candidate, depth):
        """Keep candidate c as a new node, and point its copies under the same parent to it."""
        c.node = len(self.tokens)
        for other in self.candidates.get(parent, []):
            if other.token == c.token:
                other.node = c.node
        self.tokens.append(c.token)
        self.parents.append(parent)
        self.depths.append(depth)
        self.q.append(c.q)
        self.logp.append(c.logp)
        self.sources.append(c.source)


class Lookup:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the context's
    longest recurring suffix are proposed as point masses, at no draft cost. The suffix is
    2 to `n` tokens long: one token recurs by chance too often, and a long match tells which
    of several similar lines is being copied. `counts` hold, per match length (2, 3, or 4
    and more), the lookup tokens accepted and reached (their parent accepted) over the
    recent steps whose match had that length (each decays the counts by 0.9, so about the
    last 10 count), from a prior of 1 in 4 worth one token: Beta(1/4, 3/4), its weight near
    0 and near 1, for a lookup mostly either copies or guesses. `runs` turns the counts into
    the chance of a run of j accepted tokens. A long match in an edited file is nearly
    always right, a short one in fresh text mostly chance: each length earns its own trust."""

    def __init__(self, n=16, most=64):
        self.n, self.most, self.matched = n, most, 0
        self.counts = {k: [0.25, 1.0] for k in (2, 3, 4)}    # match length (4: 4 or more) -> [accepted, reached]

    def continuation(self, tokens):
        """(what followed the latest earlier occurrence of the longest recurring suffix, its length)."""
        best, end = 1, -1
        for i in range(len(tokens) - 2, -1, -1):          # where an earlier occurrence ends, latest first
            n = 0
            while n < self.n and n <= i and tokens[i - n] == tokens[-1 - n]:
                n += 1
            if n > best:
                best, end = n, i
                if n == self.n:
                    break
        return (tokens[end + 1:end + 1 + self.most], best) if end >= 0 else ([], 0)

    def propose(self, tokens):
        """This step's continuation; observe() will judge it by its match length."""
        guess, n = self.continuation(tokens)
        self.matched = min(n, 4)
        return guess

    def runs(self, most):
        """P(the next j lookup tokens are all accepted | the parent of the first was), j = 1..most:
        E[r^j] = prod_{i<j} (a + i) / (a + b + i) for the acceptance rate r of this match length
        under a Beta(a = accepted, b = reached - accepted) belief. Unlike E[r]^j it keeps the
        long runs of a file being copied: while r is uncertain, it may well be near 1, and
        each accepted run makes it surer."""
        a, reached = self.counts[self.matched]
        p, out = 1.0, []
        for i in range(most):
            p *= (a + i) / (reached + i)
            out.append(p)
        return out

    def observe(self, t: Tree, path):
        if not self.matched:
            return
        reached, accepted, c = {-1} | set(path), set(path), self.counts[self.matched]
        c[0], c[1] = 0.9 * c[0], 0.9 * c[1]
        for i, source in enumerate(t.sources):
            if source != "draft" and t.parents[i] in reached:
                c[1] += 1
                c[0] += i in accepted


class Costs:
    """What this machine measures: seconds of a draft and of a target forward, each as a
    function of the tokens it feeds (least squares on the last 32 calls: a + b * n). Width is
    not free: in float32, or for a wide tree level, a batched pass costs much more than one token."""

    def __init__(self):
        self.draft, self.target, self.lines = [], [], {}

    def add_draft(self, n, seconds):
        self.draft = (self.draft + [(n, seconds)])[-32:]
        self.lines.pop("draft", None)

    def add_target(self, n, seconds):
        self.target = (self.target + [(n, seconds)])[-32:]
        self.lines.pop("target", None)

    def draft_pass(self, n):
        return self.line("draft", 0.5, n)

    def target_pass(self, n):
        return self.line("target", 1.0, n)

    def line(self, kind, default, n):
        """a + b * n, fitted once per new sample: AutoSize prices hundreds of trees a step."""
        if kind not in self.lines:
            self.lines[kind] = fit(getattr(self, kind), default)
        a, b = self.lines[kind]
        return a + b * n

    def target_sizes(self):
        return {n for n, _ in self.target}


def fit(samples, default):
    """(a, b) of a + b * n (b >= 0) fitted to (n, seconds) samples. Until two sizes have been
    seen, a pass is taken to cost in proportion to its tokens (default seconds each before
    any): pessimistic, so a tree must earn its width before it is measured to be cheap."""
    if not samples:
        return 0.0, default
    ns, ts = [x for x, _ in samples], [t for _, t in samples]
    if min(ns) == max(ns):
        return 0.0, statistics.median_low(ts) / ns[0]
    mn, mt = sum(ns) / len(ns), sum(ts) / len(ts)
    b = max(sum((x - mn) * (t - mt) for x, t in samples) / sum((x - mn) ** 2 for x in ns), 0.0)
    return mt - b * mn, b


class AutoSize:
    """Sizes each tree for expected tokens per second (see the module docstring), and says when
    to leave the draft behind (`renting`). draft_share: the draft's FLOPs per token over the
    target's (model.Config.layer_weights)."""

    def __init__(self, draft_share=1.0):
        self.costs, self.calibration, self.drafted = Costs(), 0.8, []
        self.draft_share, self.catch_up_per_token, self.rent = draft_share, math.inf, 0.0

    def add_prompt(self, tokens, seconds):
        """The target's prompt pass, timed with no draft in it. A pass over many tokens is
        compute-bound, so the draft is expected to feed n tokens in n x draft_share x these
        seconds per token."""
        self.catch_up_per_token = seconds / tokens * self.draft_share

    def add_step(self, t, path, seconds):
        """A timed step. One the draft grew counts toward `measured` (the last 8 are kept) and
        ends the rent; one without the draft that gave a single token adds to the rent."""
        if t.levels:
            self.drafted = (self.drafted + [(len(path) + 1, seconds)])[-8:]
            self.rent = 0.0
        elif not path:
            self.rent += seconds

    @property
    def measured(self):
        """Tokens per second of the last 8 steps the draft grew (infinite before any was timed):
        what a lookup-only step is expected to beat."""
        return sum(n for n, _ in self.drafted) / sum(s for _, s in self.drafted) if self.drafted else math.inf

    def renting(self, lag):
        """Ski rental: whether to go on without a draft that lacks `lag` tokens. Feeding it
        the lag - 1 tokens a step does not otherwise feed is a purchase (of unknown, so
        infinite, price before the prompt pass is timed); a step without the draft that gives
        a single token is a rent of one plain step's time. The draft is fed once another rent
        would take the rent paid since it was last fed past the price: about twice the best
        choice in hindsight at worst, whether the lookup carries the rest of the output (an
        edited file) or never does. A short prompt or lag costs less than one rent: the draft
        is fed at once."""
        step = self.costs.target_pass(1) if self.costs.target else 0.0    # unmeasured: a first rent measures it
        return lag > 1 and self.rent + step < (lag - 1) * self.catch_up_per_token

    def rate(self, gain, drafting, nodes, looked=0.0):
        """Expected tokens per second: 1 + the draft's expected accepted nodes (calibrated) +
        the lookup chain's (`looked`, already measured), over drafting and one target pass."""
        return (1 + self.calibration * gain + looked) / (drafting + self.costs.target_pass(nodes + 1))

    def drafting(self, t):
        """Expected seconds of the draft forwards grown so far: the root, then one per level's width."""
        widths = [t.depths.count(d) for d in range(1, t.levels)]
        return self.costs.draft_pass(1) + sum(self.costs.draft_pass(w) for w in widths)

    def keep(self, scores, q, t):
        """How many of the level's candidates (probabilities exp(logp), best first; q: each
        one's probability given its parent) to keep, the expected rate then, and the rate
        expected of one level more over them. That level is priced as one more draft pass and
        two children per kept node, and expected to be accepted as often as the best candidate
        here was proposed: its q, not its cumulative probability, which shrinks with depth and
        would stop a confident draft's tree after a level or two."""
        gain, drafting = sum(math.exp(x) for x in t.logp), self.drafting(t)
        best_m, best = 0, self.rate(gain, drafting, len(t.tokens))
        g = gain
        for m, s in enumerate(scores, 1):
            g += s
            r = self.rate(g, drafting, len(t.tokens) + m)
            if r > best:
                best_m, best = m, r
        kept = sum(scores[:best_m])
        deeper = self.rate(gain + kept + kept * (q[0] if q else 0), drafting + self.costs.draft_pass(best_m),
                           len(t.tokens) + 2 * best_m)
        sizes = self.costs.target_sizes()
        if len(sizes) < 2 and scores:    # a probe: until two sizes are timed, width's price is a guess (fit)
            best_m = max(best_m, 1)
            deeper = math.inf if len(t.tokens) + best_m + 1 in sizes else deeper
        return best_m, best, deeper

    def chain(self, t, tip, runs, drafting):
        """How many lookup tokens (at most len(runs)) to hang below node `tip` (-1: the root, a
        lookup-only step) with no further draft forward, and the expected tokens per second
        then: the j-th is accepted with the probability of reaching the tip times runs[j - 1]
        (Lookup.runs), and costs one more target token."""
        gain, n = sum(math.exp(x) for x in t.logp), len(t.tokens)
        reach = self.calibration * math.exp(t.logp[tip]) if tip >= 0 else 1.0
        best_j, best, looked = 0, self.rate(gain, drafting, n), 0.0
        for j, run in enumerate(runs, 1):
            looked += reach * run
            r = self.rate(gain, drafting, n + j, looked)
            if r > best:
                best_j, best = j, r
        if len(self.costs.target_sizes()) < 2:    # a probe, as in keep: width's price is a guess until timed
            best_j = max(best_j, min(len(runs), 1))
        return best_j, best

    def observe(self, t, path):
        """Calibrate the draft's predictions: accepted draft-scored nodes over their expected number."""
        drafted = [i for i, q in enumerate(t.q) if not math.isnan(q)]
        predicted = sum(math.exp(t.logp[i]) for i in drafted)
        if predicted > 0:
            accepted = len(set(path) & set(drafted))
            self.calibration = min(1.0, max(0.05, 0.8 * self.calibration + 0.2 * accepted / predicted))


def children(q, branch, drawn, e):
    """Candidate tokens of a node: `branch` i.i.d. draws from q (drawn; e [branch, V], one race
    each), else the `branch` best of q / e (coupled: e = E_t, the first being the draft's race
    winner) or of q (e None)."""
    if drawn:
        return sampler.draw(q.expand(branch, -1), e).tolist()
    return (q / e if e is not None else q).topk(min(branch, int((q > 0).sum()))).indices.tolist()


@dataclass
class Growth:
    """What one tree's growth needs besides the tree: how candidates are made, and the lookup
    continuation with the deepest kept node on its path (tip; -1 = the root)."""
    settings: object
    budget: Budget
    vocab: int
    generator: object
    races: object
    drawn: bool
    prefix: int
    guess: list
    runs: list
    tip: int = -1


def grow(draft, tokens, settings, vocab, generator, budget: Budget, sizer: AutoSize | None = None, races=None,
         lookup: Lookup | None = None):
    """A token tree from the draft after `tokens` (the last token is the root): level by level,
    expand the frontier into candidates, choose the ones to keep, and feed them to the draft.
    races (sampler.Races, coupled verification): children are the best of the draft's race at
    their position instead of i.i.d. draws or the top of q. lookup: its continuation joins
    the candidates level by level, and then hangs below the tree as a chain with no draft
    forward, as long as the cost model (or the budgets) allow. The step goes without the
    draft (the chain alone, or no node at all: a plain step) where AutoSize expects that
    chain to beat the draft's trees as measured, or while the draft lags by more tokens than
    are yet worth feeding it (AutoSize.renting: the prompt, at first). The draft catches up
    on the tokens it lacks when it is next used."""
    t0 = time.perf_counter()
    t = Tree()
    drawn = races is None and (budget.children == "sample" or (budget.children == "auto" and settings.temperature > 0))
    guess = lookup.propose(tokens) if lookup else []
    g = Growth(settings, budget, vocab, generator, races, drawn, len(tokens), guess,
               lookup.runs(len(guess)) if guess else [])
    if sizer and lookup:
        j, r = sizer.chain(t, -1, g.runs[:chain_room(t, g)], drafting=0.0)     # (0, _) without a continuation
        if (j and r > sizer.measured) or sizer.renting(len(tokens) - draft.length):
            return hang_lookup(t, g, j)                # no draft forward: the chain alone, or a plain step
    new, warm = tokens[draft.length:], draft.length > 0    # the first tree's root pass holds the prompt
    q_frontier = distribution(g, draft(torch.tensor([new], device=draft.device), last=1)[0, :, :vocab])
    frontier, t.levels = [-1], 1
    if sizer and warm:
        sizer.costs.add_draft(len(new), time.perf_counter() - t0)
    for depth in range(1, budget.max_depth + 1):
        level = expand(t, g, frontier, q_frontier, depth)
        chosen, expected, deeper = choose(t, g, level, sizer, depth)
        first = len(t.tokens)
        for f, c in chosen:
            t.add(f, c, depth)
            g.tip = c.node if c.source != "draft" else g.tip
        frontier = list(range(first, len(t.tokens)))
        chained = 0
        if sizer and g.tip in frontier:                # the lookup may pay better than another draft level
            chained, chained_rate = sizer.chain(t, g.tip, g.runs[:chain_room(t, g)], sizer.drafting(t))
            expected = max(expected, chained_rate)
        if (not frontier or depth == budget.max_depth or len(t.tokens) >= budget.max_total_nodes
                or deeper <= expected or time.perf_counter() - t0 > budget.max_time):
            for f in frontier:
                t.candidates[f] = []
            break
        t1 = time.perf_counter()
        q_frontier = feed_level(draft, t, g, first, depth)
        if sizer:
            sizer.costs.add_draft(len(frontier), time.perf_counter() - t1)
    if g.tip >= 0 and t.candidates[g.tip] == []:       # the lookup reached the last level: go on without the draft
        hang_lookup(t, g, chained if sizer else chain_room(t, g))
    return t


def distribution(g: Growth, logits):
    """The draft's q over the vocabulary. Drawn children need the exact q they are drawn
    from; point masses may be ranked by any q, so greedy ranks by the plain softmax, not
    by its one-hot argmax."""
    return g.settings.probs(logits) if g.drawn or g.settings.temperature > 0 else sampler.probs(logits)


def expand(t: Tree, g: Growth, frontier, q_frontier, depth):
    """Each frontier node's candidates (kept in t.candidates, for verification), and the
    level's (parent, candidate) pairs to choose from: one per token and parent. The frontier
    node on the lookup path also gets the lookup token, first: shared with an equal point-mass
    draft candidate, or a point mass of its own beside drawn ones (verification takes each
    with its own proposal). It is scored by its q like the draft's own: where the draft has
    looked, it knows better than a blind lookup (its rate counts only for the chain below)."""
    level = []
    for f, q in zip(frontier, q_frontier):
        base = t.logp[f] if f >= 0 else 0.0
        if g.drawn:
            t.dists[f] = q
            e = sampler.exponentials(g.budget.branch, g.vocab, generator=g.generator, device=q.device)
        else:
            e = g.races.at(g.prefix + depth - 1)[0] if g.races else None
        made = [Candidate(c, float(q[c]), base + math.log(float(q[c])), point=not g.drawn)
                for c in children(q, g.budget.branch, g.drawn, e)]
        if f == g.tip and depth <= len(g.guess):
            x = g.guess[depth - 1]
            same = next((c for c in made if c.token == x and c.point), None)
            if same:
                same.source = "both"
            else:
                source = "both" if any(c.token == x for c in made) else "lookup"
                made.insert(0, Candidate(x, float(q[x]), base + math.log(max(float(q[x]), 1e-30)), source=source))
        t.candidates[f], seen = made, set()
        for c in made:
            if c.token not in seen:
                level.append((f, c))
                seen.add(c.token)
    return level


def choose(t: Tree, g: Growth, level, sizer, depth):
    """The candidates of a level to keep, best score first (or random ones, as in the tree
    paper), within the budgets; with AutoSize, the expected tokens per second then and with
    one level more (without, 0 and infinity: the budgets alone stop the growth)."""
    limit = min(g.budget.max_nodes_per_level, g.budget.max_total_nodes - len(t.tokens))
    if g.budget.prune == "random":
        chosen = random.Random(g.prefix * 1000 + depth).sample(level, min(limit, len(level)))
    else:
        chosen = sorted(level, key=lambda fc: -fc[1].logp)[:limit]
    if not sizer:
        return chosen, 0.0, math.inf
    chosen = sorted(chosen, key=lambda fc: -fc[1].logp)
    m, expected, deeper = sizer.keep([math.exp(c.logp) for _, c in chosen],
                                     [math.exp(c.logp - (t.logp[f] if f >= 0 else 0.0)) for f, c in chosen], t)
    return chosen[:m], expected, deeper


def feed_level(draft, t: Tree, g: Growth, first, depth):
    """ONE draft forward over the level's new nodes (t.tokens[first:]), each seeing the prefix
    and its ancestors at position prefix - 1 + depth; their q."""
    anc = t.ancestors()
    n = len(t.tokens) - first
    mask = torch.cat((torch.ones(n, g.prefix, dtype=torch.bool), anc[first:]), dim=1)
    positions = torch.tensor([[g.prefix - 1 + depth] * n], device=draft.device)
    logits = draft(torch.tensor([t.tokens[first:]], device=draft.device), positions, mask.to(draft.device))
    t.levels += 1
    return distribution(g, logits[0, :, :g.vocab])


def chain_room(t: Tree, g: Growth):
    """How many lookup tokens could hang below the tip: what is left of the continuation,
    within max_total_nodes."""
    return min(len(g.guess) - t.depth(g.tip), g.budget.max_total_nodes - len(t.tokens))


def hang_lookup(t: Tree, g: Growth, n):
    """The next n tokens of the lookup continuation as a chain below the tip, fed to no draft
    (as many as AutoSize expects to pay, or all the budgets allow). Their logp adds the log
    of the chance that the run from the tip to it is accepted (Lookup.runs); their q is nan:
    the draft never saw them."""
    parent, base = g.tip, t.logp[g.tip] if g.tip >= 0 else 0.0
    for run, x in zip(g.runs, g.guess[t.depth(g.tip):t.depth(g.tip) + n]):
        c = Candidate(x, float("nan"), base + math.log(max(run, 1e-30)), source="lookup")
        t.candidates[parent] = [c]
        t.add(parent, c, t.depth(parent) + 1)
        parent = c.node
    t.candidates[parent] = []
    return t


def score(target, tokens, t: Tree):
    """ONE target forward over what its cache lacks of `tokens` and every tree node; logits of
    the root and of each node, [1, 1 + N, V]."""
    new, n = tokens[target.length:], len(t.tokens)
    P = len(new)
    mask = torch.zeros(P + n, P + n, dtype=torch.bool)
    mask[:, :P] = True
    mask[:P, :P] = torch.ones(P, P, dtype=torch.bool).tril()
    mask[P:, P:] = t.ancestors()
    pos = list(range(target.length, len(tokens))) + [len(tokens) - 1 + d for d in t.depths]
    return target(torch.tensor([new + t.tokens], device=target.device), torch.tensor([pos], device=target.device),
                  mask.to(target.device), last=n + 1)


def verify(t: Tree, p, generator, one_hot=False):
    """Walk the tree with multi-round rejection sampling (sampler.tree_sample, one node at a
    time): (accepted kept nodes, next token). p [1 + N, V]: target probabilities at the root
    and at each node (one_hot: greedy). One exponential race per step: only the node that
    ends it draws."""
    node, path = -1, []
    e = sampler.exponentials(p.shape[-1], generator=generator, device=p.device, one_hot=one_hot)
    while True:
        cands = t.candidates.get(node, [])
        tokens = torch.tensor([[c.token for c in cands] or [-1]], device=p.device)
        point = torch.tensor([[c.point for c in cands] or [True]], device=p.device)
        u = torch.rand(tokens.shape, generator=generator, device=p.device)
        q = t.dists[node][None] if node in t.dists else None
        choice, token = sampler.tree_sample(p[node + 1][None], q, tokens, u, e, point)
        j = int(choice)
        if j < 0 or cands[j].node < 0:
            return path, int(token)
        node = cands[j].node
        path.append(node)


def verify_coupled(t: Tree, p, e):
    """Coupled verification (sampler's docstring): at each node the target's race winner
    w = argmax p / E is followed when it is a kept child, else emitted. p [1 + N, V] as in
    verify; e [D + 1, V]: E at the root's output position and at each depth below it."""
    node, path = -1, []
    while True:
        w = int(sampler.draw(p[node + 1], e[t.depth(node)]))
        node = next((c.node for c in t.candidates.get(node, []) if c.token == w), -1)
        if node < 0:
            return path, w
        path.append(node)


def compact(target, draft, start, t: Tree, path):
    """Keep, in both caches, the prefix up to the root and the accepted path's nodes (a draft
    that saw no node, behind after a lookup-only step, is left as it is)."""
    for model in (target, draft):                      # slots [0, start) hold the prefix, root included
        if model.length >= start:
            seen = [i for i in path if start + i < model.length]   # the draft never saw the last level
            model.compact(start, torch.tensor(seen, dtype=torch.long, device=model.device))


# ---------------------------------------------------------------------------- the picture

COLOURS = {"accepted": "#2ca02c", "rejected": "#d62728", "not reached": "#bbbbbb", "pruned": "#ffbf00",
           "root": "#1f77b4", "emitted": "#9467bd"}


def layout(t: Tree, jitter=0.0, seed=0):
    """x, y per node in a tidy layout: leaves in order, parents centred over their children;
    y = -depth. jitter adds the paper's small random horizontal offsets."""
    kids = {}
    for i, par in enumerate(t.parents):
        kids.setdefault(par, []).append(i)
    x, next_x = {}, [0.0]

    def place(node):
        ch = kids.get(node, [])
        if not ch:
            x[node] = next_x[0]
            next_x[0] += 1
        else:
            for c in ch:
                place(c)
            x[node] = (x[ch[0]] + x[ch[-1]]) / 2
    place(-1)
    rng = random.Random(seed)
    return {n: (v + rng.uniform(-jitter, jitter), -t.depth(n)) for n, v in x.items()}


def status(t: Tree, path):
    """Each kept node's status for the picture: accepted / rejected (target saw it and said no) / not reached."""
    accepted, reached = set(path), {-1} | set(path)
    return ["accepted" if i in accepted else "rejected" if t.parents[i] in reached else "not reached"
            for i in range(len(t.tokens))]


def label(tok, token):
    text = tok.decode([token]) if tok else str(token)
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= 8 else text[:7] + "…"


def draw(t: Tree, path, new_token, tok, png, jitter=0.0):
    """One step's tree as a PNG: nodes coloured by status, token and q on each, shading by
    cumulative log-probability; pruned candidates as small markers beside their parent."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pos = layout(t, jitter)
    st = status(t, path)
    pruned = [(f, c) for f, cs in t.candidates.items() for c in cs if c.node < 0]
    width = max(6.0, min(40.0, 0.45 * (1 + max((v[0] for v in pos.values()), default=0))))
    depth = max(t.depths, default=0)
    fig, ax = plt.subplots(figsize=(width, 1.6 + 1.1 * (depth + 1)))
    for i, par in enumerate(t.parents):
        (x0, y0), (x1, y1) = pos[par], pos[i]
        ax.plot([x0, x1], [y0, y1], color="#999999", lw=0.6, zorder=1)
    logp = torch.tensor(t.logp or [0.0])
    lo = float(logp.min())
    for i, s in enumerate(st):
        alpha = 0.35 + 0.65 * (1 - (t.logp[i] / lo if lo < 0 else 0))
        ax.scatter(*pos[i], s=260, color=COLOURS[s], alpha=alpha, edgecolors="black", linewidths=0.4, zorder=2)
        fs = 7 if len(t.tokens) < 60 else 5
        below = "lookup" if t.sources[i] == "lookup" else f"{t.q[i]:.2f}"
        ax.annotate(f"{label(tok, t.tokens[i])}\n{below}", pos[i], fontsize=fs, ha="center", va="center", zorder=3)
    ax.scatter(*pos[-1], s=300, color=COLOURS["root"], edgecolors="black", zorder=2)
    for k, (f, c) in enumerate(pruned):
        x, y = pos[f]
        px = x + 0.15 * ((k % 5) - 2)
        ax.scatter(px, y - 0.55, s=30, color=COLOURS["pruned"], marker="v", zorder=2)
    end = pos[path[-1]] if path else pos[-1]
    ax.annotate(f"→ {label(tok, new_token)}", (end[0], end[1] - 0.5), color=COLOURS["emitted"], fontsize=8,
                ha="center", fontweight="bold")
    handles = [plt.Line2D([], [], marker="o", ls="", color=COLOURS[k], label=k)
               for k in ("root", "accepted", "rejected", "not reached")]
    handles.append(plt.Line2D([], [], marker="v", ls="", color=COLOURS["pruned"], label="pruned"))
    ax.legend(handles=handles, loc="upper right", fontsize=7)
    ax.set_title(f"{len(t.tokens)} nodes, {len(pruned)} pruned, depth {depth}, {t.levels} draft passes; "
                 f"accepted {len(path)} + 1 token", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return len(t.tokens), len(pruned), st


def draw_all(steps, tok, folder):
    """One frame per step (step_0001.png, ...) and generation.gif of them all."""
    from PIL import Image
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    frames = []
    for i, (t, path, new) in enumerate(steps, 1):
        png = folder / f"step_{i:04d}.png"
        draw(t, path, new, tok, png)
        frames.append(Image.open(png).convert("RGB"))
    size = (max(f.width for f in frames), max(f.height for f in frames))
    frames = [pad(f, size) for f in frames]
    gif = folder / "generation.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=700, loop=0)
    return gif


def pad(img, size):
    from PIL import Image
    canvas = Image.new("RGB", size, "white")
    canvas.paste(img, (0, 0))
    return canvas
