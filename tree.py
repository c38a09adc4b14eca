"""The token tree: grow it with the draft, verify it with the target in one pass, draw it.

Grow (level by level, ONE draft forward per level over the whole frontier):
    each frontier node f has a draft distribution q_f; its candidates are the top `branch`
    tokens of q_f (greedy / point masses) or `branch` tokens drawn i.i.d. from q_f
    (sampling); a candidate c scores its cumulative log-probability
        logp(c) = logp(f) + log q_f(c)
    and the best-scoring candidates of the level are kept (or random ones, as in the tree
    paper), within max_nodes_per_level, max_total_nodes, max_depth and max_time. The rest
    are pruned: never fed to a model, but kept in the picture and in verification.
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
goes one level deeper only while that rate is still expected to rise.
"""
import math
import random
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
class Tree:
    """Kept nodes 0..N-1 in level order (their KV slots follow the prefix in this order)."""
    tokens: list = field(default_factory=list)
    parents: list = field(default_factory=list)     # -1 = the root (the last prefix token)
    depths: list = field(default_factory=list)
    q: list = field(default_factory=list)           # draft probability of the node's token
    logp: list = field(default_factory=list)        # cumulative draft log-probability
    candidates: dict = field(default_factory=dict)  # node (-1 = root) -> [(token, child node or -1, q, logp)]
    dists: dict = field(default_factory=dict)       # node -> q_f its candidates were drawn from (only when drawn)
    levels: int = 0                                  # draft forwards spent growing

    def ancestors(self):
        """[N, N] bool: entry (i, j) says j is i or an ancestor of i."""
        n = len(self.tokens)
        anc = torch.eye(n, dtype=torch.bool)
        for i, par in enumerate(self.parents):
            if par >= 0:
                anc[i] |= anc[par]
        return anc


class Costs:
    """What this machine measures: seconds of a draft and of a target forward, each as a
    function of the tokens it feeds (least squares on the last 32 calls: a + b * n). Width is
    not free: in float32, or for a wide tree level, a batched pass costs much more than one token."""

    def __init__(self):
        self.draft, self.target = [], []

    def add_draft(self, n, seconds):
        self.draft = (self.draft + [(n, seconds)])[-32:]

    def add_target(self, n, seconds):
        self.target = (self.target + [(n, seconds)])[-32:]

    def draft_pass(self, n):
        return fit(self.draft, n, 0.5)

    def target_pass(self, n):
        return fit(self.target, n, 1.0)

    def target_sizes(self):
        return {n for n, _ in self.target}


def fit(samples, n, default):
    """a + b * n (b >= 0) fitted to (n, seconds) samples. Until two sizes have been seen, a
    pass is taken to cost in proportion to its tokens (default seconds each before any):
    pessimistic, so a tree must earn its width before it is measured to be cheap."""
    if not samples:
        return default * n
    ns = torch.tensor([x for x, _ in samples], dtype=torch.float64)
    ts = torch.tensor([t for _, t in samples], dtype=torch.float64)
    if ns.max() == ns.min():
        return float(ts.median()) * n / float(ns[0])
    b = float(((ns - ns.mean()) * (ts - ts.mean())).sum() / ((ns - ns.mean()) ** 2).sum())
    return float(ts.mean()) + max(b, 0.0) * (n - float(ns.mean()))


class AutoSize:
    """Sizes each tree for expected tokens per second (see the module docstring)."""

    def __init__(self):
        self.costs, self.calibration = Costs(), 0.8

    def rate(self, gain, drafting, nodes):
        return (1 + self.calibration * gain) / (drafting + self.costs.target_pass(nodes + 1))

    def drafting(self, t):
        """Expected seconds of the draft forwards grown so far: the root, then one per level's width."""
        widths = [t.depths.count(d) for d in range(1, t.levels)]
        return self.costs.draft_pass(1) + sum(self.costs.draft_pass(w) for w in widths)

    def keep(self, scores, q, t):
        """How many of the level's candidates (probabilities exp(logp), best first; q: the
        draft's probability of each given its parent) to keep, and whether a further level is
        expected to pay for its draft forward over them. That level is priced as one more draft
        pass and two children per kept node, and expected to be accepted as often as the best
        candidate here was proposed: its q, not its cumulative probability, which shrinks with
        depth and would stop a confident draft's tree after a level or two."""
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
                           len(t.tokens) + 2 * best_m) > best
        sizes = self.costs.target_sizes()
        if len(sizes) < 2 and scores:    # a probe: until two sizes are timed, width's price is a guess (fit)
            best_m = max(best_m, 1)
            deeper = deeper or len(t.tokens) + best_m + 1 in sizes
        return best_m, deeper

    def observe(self, t, accepted):
        predicted = sum(math.exp(x) for x in t.logp)
        if predicted > 0:
            self.calibration = min(1.0, max(0.05, 0.8 * self.calibration + 0.2 * accepted / predicted))


def children(q, branch, drawn, e):
    """Candidate tokens of a node: `branch` i.i.d. draws from q (drawn; e [branch, V], one race
    each), else the `branch` best of q / e (coupled: e = E_t, the first being the draft's race
    winner) or of q (e None)."""
    if drawn:
        return sampler.draw(q.expand(branch, -1), e).tolist()
    return (q / e if e is not None else q).topk(min(branch, int((q > 0).sum()))).indices.tolist()


def grow(draft, tokens, settings, vocab, generator, budget: Budget, sizer: AutoSize | None = None, races=None):
    """A token tree from the draft after `tokens` (the last token is the root). races
    (sampler.Races, coupled verification): children are the best of the draft's race at
    their position, instead of i.i.d. draws or the top of q."""
    t0 = time.perf_counter()
    t = Tree()
    drawn = races is None and (budget.children == "sample" or (budget.children == "auto" and settings.temperature > 0))
    # drawn children need the exact q they are drawn from; top-k children are point masses,
    # so any q may rank them: greedy ranks by the plain softmax, not by its one-hot argmax
    dist = lambda logits: settings.probs(logits) if drawn or settings.temperature > 0 else sampler.probs(logits)
    new, warm = tokens[draft.length:], draft.length > 0    # the first tree's root pass holds the prompt
    q_frontier = dist(draft(torch.tensor([new], device=draft.device), last=1)[0, :, :vocab])
    prefix, frontier, t.levels = len(tokens), [-1], 1
    if sizer and warm:
        sizer.costs.add_draft(len(new), time.perf_counter() - t0)
    for depth in range(1, budget.max_depth + 1):
        unique = []                                   # (parent, candidate); a repeated token is never a new node
        for f, q in zip(frontier, q_frontier):
            if drawn:
                t.dists[f] = q
            e = (sampler.exponentials(budget.branch, vocab, generator=generator, device=q.device) if drawn
                 else races.at(prefix + depth - 1)[0] if races else None)
            base = t.logp[f] if f >= 0 else 0.0
            t.candidates[f], seen = [], set()
            for c in children(q, budget.branch, drawn, e):
                qc = float(q[c])
                t.candidates[f].append([c, -1, qc, base + math.log(qc)])
                if c not in seen:
                    unique.append((f, t.candidates[f][-1]))
                    seen.add(c)
        limit = min(budget.max_nodes_per_level, budget.max_total_nodes - len(t.tokens))
        if budget.prune == "random":
            chosen = random.Random(len(tokens) * 1000 + depth).sample(unique, min(limit, len(unique)))
        else:
            chosen = sorted(unique, key=lambda fc: -fc[1][3])[:limit]
        deeper = True
        if sizer:
            chosen = sorted(chosen, key=lambda fc: -fc[1][3])
            m, deeper = sizer.keep([math.exp(c[3]) for _, c in chosen], [c[2] for _, c in chosen], t)
            chosen = chosen[:m]
        first = len(t.tokens)
        for f, c in chosen:
            c[1] = len(t.tokens)
            t.tokens.append(c[0])
            t.parents.append(f)
            t.depths.append(depth)
            t.q.append(c[2])
            t.logp.append(c[3])
        frontier = list(range(first, len(t.tokens)))
        stop = (not frontier or depth == budget.max_depth or len(t.tokens) >= budget.max_total_nodes
                or not deeper or time.perf_counter() - t0 > budget.max_time)
        if stop:
            for f in frontier:
                t.candidates[f] = []
            break
        t1 = time.perf_counter()
        anc = t.ancestors()
        mask = torch.cat((torch.ones(len(frontier), prefix, dtype=torch.bool), anc[first:]), dim=1)
        positions = torch.tensor([[prefix - 1 + depth] * len(frontier)], device=draft.device)
        logits = draft(torch.tensor([t.tokens[first:]], device=draft.device), positions, mask.to(draft.device))
        q_frontier = dist(logits[0, :, :vocab])
        t.levels += 1
        if sizer:
            sizer.costs.add_draft(len(frontier), time.perf_counter() - t1)
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
        tokens = torch.tensor([[c[0] for c in cands] or [-1]], device=p.device)
        u = torch.rand(tokens.shape, generator=generator, device=p.device)
        q = t.dists[node][None] if node in t.dists else None
        choice, token = sampler.tree_sample(p[node + 1][None], q, tokens, u, e)
        j = int(choice)
        if j < 0 or cands[j][1] < 0:
            return path, int(token)
        node = cands[j][1]
        path.append(node)


def verify_coupled(t: Tree, p, e):
    """Coupled verification (sampler's docstring): at each node the target's race winner
    w = argmax p / E is followed when it is a kept child, else emitted. p [1 + N, V] as in
    verify; e [D + 1, V]: E at the root's output position and at each depth below it."""
    node, path = -1, []
    while True:
        w = int(sampler.draw(p[node + 1], e[t.depths[node] if node >= 0 else 0]))
        node = next((c[1] for c in t.candidates.get(node, []) if c[0] == w), -1)
        if node < 0:
            return path, w
        path.append(node)


def compact(target, draft, start, t: Tree, path):
    """Keep, in both caches, the prefix up to the root and the accepted path's nodes."""
    for model in (target, draft):                      # slots [0, start) hold the prefix, root included
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
    return {n: (v + rng.uniform(-jitter, jitter), -(t.depths[n] if n >= 0 else 0)) for n, v in x.items()}


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
    pruned = [(f, c) for f, cs in t.candidates.items() for c in cs if c[1] < 0]
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
        ax.annotate(f"{label(tok, t.tokens[i])}\n{t.q[i]:.2f}", pos[i], fontsize=fs, ha="center", va="center", zorder=3)
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
