"""The token tree: grow it with the draft, score it with the target in one pass, verify it.

Grow (level by level, ONE draft forward per level over the whole frontier):
    each frontier node f has a draft distribution q_f; its candidates are the top `branch`
    tokens of q_f (greedy / point masses), `branch` tokens drawn i.i.d. from q_f (sampling),
    or the best of the draft's race at their position (coupled verification); a candidate c
    scores its cumulative log-probability
        logp(c) = logp(f) + log q_f(c)
    and the best-scoring candidates of the level are kept (or random ones, as in the tree
    paper: "Tree-Based Speculative Decoding with Adaptive Branching for Automated GPU Kernel
    Generation"), within max_nodes_per_level, max_total_nodes, max_depth and max_time. The
    rest are pruned: never fed to a model, but kept in the picture and in verification. How
    many to keep, and whether to grow another level, is the plan's to say (`Plan`; policy.py
    fills the budgets, or maximises expected tokens per second).
    Lookup (`continuation`): what followed the latest earlier occurrence of the context's
    longest recurring suffix joins the levels as point-mass candidates, and its rest may hang
    below as a run no draft forward sees (the whole tree, when the plan drafts nothing).
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
Compact: both KV caches keep the prefix and the accepted path, nothing else (Transformer.compact).
"""
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

import sampler

ROOT = 0              # the root is node 0: the prefix's last token, whose next token the step decides


@dataclass
class Budget:
    max_depth: int = 8
    max_nodes_per_level: int = 25
    max_total_nodes: int = 200
    max_time: float = 10.0         # seconds to grow one tree (checked before each draft pass)
    branch: int = 4                # candidates per expanded node
    prune: str = "best"            # "best" cumulative log-probabilities, or "random" (the tree paper's option)
    children: str = "auto"         # "top-k", "sample" (i.i.d. draws), or "auto": sample when temperature > 0


class Plan(Protocol):
    """What `grow` asks of a step's plan (policy.py's Fixed and AutoPlan): numbers; nothing changes."""
    drafts: bool                   # whether this step runs the draft (else lookup tokens alone, or a plain step)

    def level(self, t: "Tree", parents: list, q: list) -> tuple:
        """For a level's candidates, best first (their parents, their draft probabilities): (each
        one's value, the chance that it is accepted; how many to keep; whether to draft below them)."""

    def lookup(self, t: "Tree", tip: int, room: int) -> int:
        """How many of `room` lookup tokens to hang below node `tip`."""

    def more(self, q: list) -> bool:
        """A chain step: whether to draft one more token after those with draft probabilities q."""


@dataclass
class Candidate:
    """A proposed child of a tree node. q: the draft's probability of the token given the
    parent (nan where the draft never saw the parent); logp: its cumulative log-probability;
    point: proposed deterministically (a top-k or race pick, a lookup token) rather than
    drawn from the parent's q; source: "draft", "lookup" or "both"; node: the kept node it
    became (None: pruned)."""
    token: int
    q: float
    logp: float
    point: bool = True
    source: str = "draft"
    node: int | None = None


@dataclass
class Tree:
    """Node 0 is the root (the prefix's last token); the kept nodes 1..N follow in level order.
    Node i is fed at KV slot prefix - 1 + i, and is row i of the target's pass over the tree."""
    tokens: list = field(default_factory=lambda: [None])    # the root's: the prefix's last
    parents: list = field(default_factory=lambda: [None])   # the root has none; a node's is an earlier node
    depths: list = field(default_factory=lambda: [0])
    q: list = field(default_factory=lambda: [math.nan])     # draft probability of the node's token given its parent
    logp: list = field(default_factory=lambda: [0.0])       # cumulative log-probability
    sources: list = field(default_factory=lambda: ["prefix"])  # then "draft", "lookup" or "both"
    values: list = field(default_factory=lambda: [1.0])     # the chance it is accepted, as the plan valued it (nan: not)
    candidates: dict = field(default_factory=dict)          # node -> [Candidate], in the order made
    dists: dict = field(default_factory=dict)               # node -> q_f its drawn candidates came from
    levels: int = 0                                          # draft forwards spent growing

    @classmethod
    def of_chain(cls, tokens, q):
        """A chain step's K draft tokens as a tree of one node per level (what Stats and the policy read)."""
        t = cls(levels=len(tokens))
        for i, (x, qx) in enumerate(zip(tokens, q)):
            t.add(i, Candidate(x, qx, 0.0))
        return t

    def add(self, parent, c: Candidate, value=math.nan):
        """Keep candidate c as a new node, and point its copies under the same parent to it."""
        c.node = len(self.tokens)
        for other in self.candidates.get(parent, []):
            if other.token == c.token:
                other.node = c.node
        self.tokens.append(c.token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.q.append(c.q)
        self.logp.append(c.logp)
        self.sources.append(c.source)
        self.values.append(value)

    def ancestors(self):
        """[N + 1, N + 1] bool: entry (i, j) says j is i or an ancestor of i."""
        anc = torch.eye(len(self.tokens), dtype=torch.bool)
        for i in range(1, len(self.tokens)):
            anc[i] |= anc[self.parents[i]]
        return anc

    def reached(self, path):
        """Nodes whose parent was accepted (so the target judged them)."""
        judged = {ROOT, *path}
        return [i for i in range(1, len(self.tokens)) if self.parents[i] in judged]


def continuation(tokens, longest=16, most=64):
    """Prompt lookup: (what followed the latest earlier occurrence of the longest suffix of
    `tokens` that recurs, 2 to `longest` tokens long, at most `most` of it; the match length).
    One token recurs by chance too often; a long match tells which of several similar lines
    is being copied."""
    best, end = 1, None
    for i in range(len(tokens) - 2, -1, -1):          # where an earlier occurrence ends, latest first
        n = 0
        while n < longest and n <= i and tokens[i - n] == tokens[-1 - n]:
            n += 1
        if n > best:
            best, end = n, i
            if n == longest:
                break
    return (tokens[end + 1:end + 1 + most], best) if end is not None else ([], 0)


@dataclass
class Growth:
    """What one tree's growth needs besides the tree and the plan: how candidates are made,
    the lookup continuation (guess) and the deepest kept node on its path (tip)."""
    settings: object
    budget: Budget
    vocab: int
    generator: object
    races: object                  # sampler.Races for coupled verification, else None
    prefix: int                    # tokens before the tree (its root is the last)
    guess: list
    tip: int = ROOT

    @property
    def drawn(self):
        """Children drawn i.i.d. from q (rejection sampling at temperature > 0), not point masses."""
        b = self.budget
        return self.races is None and (b.children == "sample" or (b.children == "auto" and self.settings.temperature > 0))


def grow(draft, tokens, plan: Plan, g: Growth):
    """A token tree from the draft after `tokens` (the last token is the root): level by level,
    one draft pass gives the frontier's q, its candidates are made, and the plan values them
    and keeps the best, while the budgets and the plan allow; then what is left of the lookup
    continuation hangs below its tip. A plan that does not draft gives a tree of lookup tokens
    alone, or none (a plain step). The draft's first pass catches up on the tokens it lacks."""
    t, deadline, b = Tree(tokens=[tokens[-1]]), time.perf_counter() + g.budget.max_time, g.budget
    if not plan.drafts:
        return hang_lookup(t, g, plan.lookup(t, ROOT, min(len(g.guess), b.max_total_nodes)))
    frontier, first = [ROOT], 1           # the first pass feeds no node: the prefix it lacks, the root last
    for depth in range(1, b.max_depth + 1):
        q = proposal(g.settings, score(draft, tokens, t, first)[0, :, :g.vocab], g.drawn)    # the frontier's
        t.levels += 1
        level = choose(t, g, expand(t, g, frontier, q, depth), depth)
        values, m, deeper = plan.level(t, [parent for parent, _ in level], [c.q for _, c in level])
        first = len(t.tokens)
        for (parent, c), value in zip(level[:m], values):
            t.add(parent, c, value)
            g.tip = c.node if c.source != "draft" else g.tip
        frontier = list(range(first, len(t.tokens)))
        if not (m and deeper and depth < b.max_depth and len(t.tokens) <= b.max_total_nodes
                and time.perf_counter() < deadline):
            break
    for f in frontier:
        t.candidates.setdefault(f, [])
    room = min(len(g.guess) - t.depths[g.tip], b.max_total_nodes + 1 - len(t.tokens))
    if g.tip != ROOT and not t.candidates[g.tip] and room > 0:   # the lookup reached the last level
        hang_lookup(t, g, plan.lookup(t, g.tip, room))
    return t


def score(model, tokens, t: Tree, first=1):
    """ONE forward of `model` over what its cache lacks of `tokens` (the prefix, the root its
    last) and the nodes from `first` on, each node seeing the prefix and its ancestors at
    position prefix - 1 + depth: the logits [1, rows, V] of the nodes it fed, the root's
    first where the model lacked it (the target's pass: row i is node i)."""
    prefix, nodes, start = len(tokens), t.tokens[first:], model.length
    new = tokens[start:] + nodes
    T, S = len(new), start + len(new)
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)                 # the prefix: causal
    mask[T - len(nodes):, prefix:] = t.ancestors()[first:, 1:]             # a node: its ancestors among the nodes
    pos = list(range(start, prefix)) + [prefix - 1 + d for d in t.depths[first:]]
    return model(torch.tensor([new]), torch.tensor([pos]), mask if nodes else None, last=S - max(start, prefix - 1))


def proposal(settings, logits, drawn=False):
    """The draft's q over the vocabulary, as proposals are ranked and verified: drawn ones
    need the exact distribution they are drawn from, the sampling one; point masses may be
    ranked by any q, so greedy ranks by the plain softmax (its one-hot argmax would rank
    nothing). Shared by chain steps (specdecode.py) and trees."""
    return settings.probs(logits) if drawn or settings.temperature > 0 else logits.softmax(-1)


def expand(t: Tree, g: Growth, frontier, q_frontier, depth):
    """Each frontier node's candidates (kept in t.candidates, for verification), and the
    level's (parent, candidate) pairs to choose from: one per token and parent. A node's
    candidates are `branch` i.i.d. draws from its q (drawn), else the `branch` best of q / E
    (coupled: E the exponentials of their position, the first being the draft's race winner)
    or of q. The frontier node on the lookup path also gets the lookup token, first: shared
    with an equal point-mass draft candidate, or a point mass of its own beside drawn ones
    (verification takes each with its own proposal). It is scored by its q like the draft's
    own: where the draft has looked, it knows better than a blind lookup."""
    level, races = [], g.races.at(g.prefix + depth - 1)[0] if g.races else None
    for f, q in zip(frontier, q_frontier):
        if g.drawn:
            t.dists[f] = q
            e = sampler.exponentials(g.budget.branch, g.vocab, generator=g.generator, device=q.device)
            picks = sampler.draw(q.expand(g.budget.branch, -1), e).tolist()
        else:
            picks = (q / races if races is not None else q).topk(min(g.budget.branch, int((q > 0).sum()))).indices.tolist()
        made = [Candidate(c, float(q[c]), t.logp[f] + math.log(float(q[c])), point=not g.drawn) for c in picks]
        if f == g.tip and depth <= len(g.guess):
            x = g.guess[depth - 1]
            same = next((c for c in made if c.token == x and c.point), None)
            if same:
                same.source = "both"
            else:
                source = "both" if any(c.token == x for c in made) else "lookup"
                made.insert(0, Candidate(x, float(q[x]), t.logp[f] + math.log(max(float(q[x]), 1e-30)), source=source))
        t.candidates[f], tokens = made, set()
        for c in made:
            if c.token not in tokens:
                level.append((f, c))
                tokens.add(c.token)
    return level


def choose(t: Tree, g: Growth, level, depth):
    """The candidates of a level that the budgets allow, best score first (or random ones, the
    tree paper's option, drawn from the run's seed)."""
    limit = min(g.budget.max_nodes_per_level, g.budget.max_total_nodes + 1 - len(t.tokens))
    if g.budget.prune == "random":
        return random.Random(f"{g.settings.seed}:{g.prefix}:{depth}").sample(level, min(limit, len(level)))
    return sorted(level, key=lambda fc: -fc[1].logp)[:limit]


def hang_lookup(t: Tree, g: Growth, n):
    """The next n tokens of the lookup continuation as a chain below the tip, fed to no draft;
    their q is nan: the draft never saw them."""
    parent, base = g.tip, t.logp[g.tip]
    for x in g.guess[t.depths[g.tip]:t.depths[g.tip] + n]:
        c = Candidate(x, float("nan"), base, source="lookup")
        t.candidates[parent] = [c]
        t.add(parent, c)
        parent = c.node
    t.candidates[parent] = []
    return t


def verify(t: Tree, p, generator, one_hot=False):
    """Walk the tree with multi-round rejection sampling (sampler.tree_sample, one node at a
    time): (accepted nodes, next token). p [N + 1, V]: target probabilities at each node (the
    root's first; one_hot: greedy). One exponential race per step: only the node that ends
    it draws."""
    node, path = ROOT, []
    e = sampler.exponentials(p.shape[-1], generator=generator, device=p.device, one_hot=one_hot)
    while True:
        cands = t.candidates.get(node, [])
        tokens = torch.tensor([[c.token for c in cands] or [-1]], device=p.device)     # -1: no candidate
        point = torch.tensor([[c.point for c in cands] or [True]], device=p.device)
        u = torch.rand(tokens.shape, generator=generator, device=p.device)
        q = t.dists[node][None] if node in t.dists else None
        choice, token = sampler.tree_sample(p[node][None], q, tokens, u, e, point)
        j = int(choice)
        if j < 0 or cands[j].node is None:
            return path, int(token)
        node = cands[j].node
        path.append(node)


def verify_coupled(t: Tree, p, e):
    """Coupled verification (sampler's docstring): at each node the target's race winner
    w = argmax p / E is followed when it is a kept child, else emitted. p [N + 1, V] as in
    verify; e [D + 1, V]: E at the root's output position and at each depth below it."""
    node, path = ROOT, []
    while True:
        w = int(sampler.draw(p[node], e[t.depths[node]]))
        node = next((c.node for c in t.candidates.get(node, []) if c.token == w), None)
        if node is None:
            return path, w
        path.append(node)


# ---------------------------------------------------------------------------- the picture

COLOURS = {"accepted": "#2ca02c", "rejected": "#d62728", "not reached": "#bbbbbb", "pruned": "#ffbf00",
           "root": "#1f77b4", "emitted": "#9467bd"}


def layout(t: Tree):
    """x, y per node in a tidy layout: leaves in order, parents centred over their children; y = -depth."""
    kids = {}
    for i in range(1, len(t.tokens)):
        kids.setdefault(t.parents[i], []).append(i)
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
    place(ROOT)
    return {n: (v, -t.depths[n]) for n, v in x.items()}


def status(t: Tree, path):
    """Kept nodes' statuses (nodes 1..N) for the picture: accepted / rejected (the target saw it
    and said no) / not reached."""
    accepted, reached = set(path), {ROOT, *path}
    return ["accepted" if i in accepted else "rejected" if t.parents[i] in reached else "not reached"
            for i in range(1, len(t.tokens))]


def label(tok, token):
    text = tok.decode([token]) if tok else str(token)
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= 8 else text[:7] + "…"


def render(t: Tree, path, new_token, tok, png):
    """One step's tree as a PNG: nodes coloured by status, token and q on each, shading by
    cumulative log-probability; pruned candidates as small markers beside their parent."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pos = layout(t)
    st = status(t, path)
    pruned = [(f, c) for f, cs in t.candidates.items() for c in cs if c.node is None]
    width = max(6.0, min(40.0, 0.45 * (1 + max((v[0] for v in pos.values()), default=0))))
    depth = max(t.depths)
    fig, ax = plt.subplots(figsize=(width, 1.6 + 1.1 * (depth + 1)))
    for i in range(1, len(t.tokens)):
        ax.plot(*zip(pos[t.parents[i]], pos[i]), color="#999999", lw=0.6, zorder=1)
    lo, fontsize = min(t.logp), 7 if len(t.tokens) < 60 else 5
    for i, s in enumerate(st, 1):
        alpha = 0.35 + 0.65 * (1 - (t.logp[i] / lo if lo < 0 else 0))
        ax.scatter(*pos[i], s=260, color=COLOURS[s], alpha=alpha, edgecolors="black", linewidths=0.4, zorder=2)
        below = "lookup" if t.sources[i] == "lookup" else f"{t.q[i]:.2f}"
        ax.annotate(f"{label(tok, t.tokens[i])}\n{below}", pos[i], fontsize=fontsize, ha="center", va="center", zorder=3)
    ax.scatter(*pos[ROOT], s=300, color=COLOURS["root"], edgecolors="black", zorder=2)
    for k, (f, c) in enumerate(pruned):
        ax.scatter(pos[f][0] + 0.15 * ((k % 5) - 2), pos[f][1] - 0.55, s=30, color=COLOURS["pruned"], marker="v", zorder=2)
    end = pos[path[-1]] if path else pos[ROOT]
    ax.annotate(f"→ {label(tok, new_token)}", (end[0], end[1] - 0.5), color=COLOURS["emitted"], fontsize=8,
                ha="center", fontweight="bold")
    handles = [plt.Line2D([], [], marker="v" if k == "pruned" else "o", ls="", color=COLOURS[k], label=k)
               for k in ("root", "accepted", "rejected", "not reached", "pruned")]
    ax.legend(handles=handles, loc="upper right", fontsize=7)
    ax.set_title(f"{len(t.tokens) - 1} nodes, {len(pruned)} pruned, depth {depth}, {t.levels} draft passes; "
                 f"accepted {len(path)} + 1 token", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return len(t.tokens) - 1, len(pruned), st


def render_all(steps, tok, folder):
    """One frame per step (step_0001.png, ...) and generation.gif of them all, each frame on a
    white canvas the size of the largest."""
    from PIL import Image
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i, (t, path, new) in enumerate(steps, 1):
        render(t, path, new, tok, folder / f"step_{i:04d}.png")
        images.append(Image.open(folder / f"step_{i:04d}.png").convert("RGB"))
    frames = [Image.new("RGB", (max(f.width for f in images), max(f.height for f in images)), "white") for _ in images]
    for canvas, image in zip(frames, images):
        canvas.paste(image, (0, 0))
    gif = folder / "generation.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=700, loop=0)
    return gif
