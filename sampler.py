"""Logits -> probabilities, and the rejection sampler that keeps the target's distribution.

Speculative sampling (Leviathan et al. 2023; Chen et al. 2023). The draft proposed
x_1..x_K with probabilities q_i; the target scored the same positions, p_i, plus one more,
p_{K+1}. For i = 1..K: accept x_i with probability min(1, p_i(x_i) / q_i(x_i)), i.e. when
u_i * q_i(x_i) < p_i(x_i) for u_i ~ U[0,1). At the first rejection emit a token from the
residual norm(max(0, p_i - q_i)) and stop; if all K are accepted emit a bonus token from
p_{K+1}. Each emitted token is then distributed exactly as p.

Sampling from r (unnormalised, r >= 0) is done with an exponential race:
argmax_v r_v / E_v with E_v ~ Exp(1) picks v with probability r_v / sum(r) (the minimum of
independent Exp(r_v) variables E_v / r_v falls on v with that probability). A sample is
then a parallel argmax, which is what the CUDA kernel computes. (argmax of r alone, as the
seed report did, is not a sample: it changes the output distribution. The seed report:
"Optimized CUDA Kernel for Rejection Sampling in Speculative Decoding", Huang, Chen and Chang.)

Greedy decoding is the one-hot special case: with p and q one-hot on the argmaxes, x_i is
accepted iff it equals the target's argmax, and the residual is the target's argmax.

Coupled verification (drafter-invariant speculative decoding; Daliri, Musco and Suresh 2024,
"Coupling without communication"). Output position t has its own exponentials E_t, drawn
from (seed, t) alone (`Races`). The target's token there is argmax_v p_t(v) / E_t(v), an
exact sample from p_t; the draft proposes with the same race on its q_t. A proposal is
accepted iff it equals the target's race winner, and otherwise the winner is emitted. The
output is then token for token what plain decoding samples with the same seed, whatever the
draft proposed: a run reproduces even when wall-clock time sizes its trees. It accepts a
proposal with probability at least (1 - TV) / (1 + TV) (TV = the total variation between
p_t and q_t), against exactly 1 - TV for rejection sampling.

One contract, three implementations that return the same tokens for the same inputs:
  p [B, K+1, V] target probs, q [B, K, V] draft probs, draft [B, K] int64,
  u [B, K] float32 uniforms, e [B, V] float32 exponentials (one race per row)
  -> tokens [B, K+1] int64 (accepted drafts, then the emitted token, then -1), n [B] accepted.
A token tree has its own contract, with the same three implementations: tree_sample decides
at a tree node among several candidate children (SpecInfer's multi-round rejection).
"""
import torch

from linears import SpecdecodeError, compiled


class SamplerError(SpecdecodeError):
    """Inputs the sampler refuses: NaN or negative probabilities, bad shapes or token ids."""


def probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """float32 probabilities from logits [..., V]: softmax(logits / temperature) restricted to
    the top_k largest and to the smallest set whose mass reaches top_p, renormalised.
    temperature 0 is greedy: one-hot on the argmax."""
    logits = logits.float()
    if torch.isnan(logits).any():
        raise SamplerError("NaN in the model's logits")
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_p = sorted_logits.softmax(-1)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p          # mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def draw(p, e):
    """A sample from (unnormalised) p [..., V] by the exponential race with e ~ Exp(1)."""
    return (p / e).argmax(-1)


def exponentials(*shape, generator=None, device="cpu", one_hot=False):
    """E ~ Exp(1) for exponential races (draw). A race over a one-hot p (greedy decoding) is
    won by the hot token whatever E is, so with one_hot E = 1 and nothing random is drawn."""
    if one_hot:
        return torch.ones(shape, device=device)
    u = torch.rand(shape, generator=generator, device=device)    # E = -log(1 - U): 5x cheaper than exponential_
    return u.neg_().log1p_().neg_().clamp_min_(1e-30)            # (E = 0 would make 0 / E a NaN)


MASK64 = (1 << 64) - 1


def race_seed(seed, t):
    """A 63-bit generator seed for output position t of a run seeded `seed`: splitmix64's
    mixing of seed and t, so that neighbouring (seed, t) pairs give unrelated streams."""
    x = (seed + (t + 1) * 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return (x ^ (x >> 31)) >> 1


class Races:
    """E_t ~ Exp(1)^V for output positions t, each a function of (seed, t) alone, so that
    every way of decoding a sequence races position t with the same E_t (ones when greedy).
    The latest 32 positions are kept: a tree or a chain asks for the same ones several times."""

    def __init__(self, seed, vocab, device="cpu", one_hot=False):
        self.seed, self.vocab, self.device, self.one_hot, self.kept = seed, vocab, device, one_hot, {}

    def at(self, t0, n=1):
        """[n, V]: E_t for t = t0 .. t0 + n - 1."""
        if self.one_hot:                                   # greedy: nothing to draw
            return torch.ones(n, self.vocab, device=self.device)
        for t in range(t0, t0 + n):
            if t not in self.kept:
                g = torch.Generator(device=self.device).manual_seed(race_seed(self.seed, t))
                self.kept[t] = exponentials(self.vocab, generator=g, device=self.device)
        out = torch.stack([self.kept[t] for t in range(t0, t0 + n)])
        while len(self.kept) > 32:
            del self.kept[min(self.kept)]
        return out


def coupled_sample(p, draft, e):
    """Coupled verification of a chain: p [B, K+1, V] target probs, draft [B, K] the tokens the
    draft's races chose, e [B, K+1, V] the races' exponentials at the K+1 positions. Position
    i's winner is w_i = argmax p_i / E_i; the drafts are accepted up to the first i with
    draft_i != w_i, where w_i is emitted (w_K after all K). Same returns as rejection_sample."""
    check_probs(target=p)
    B, K = draft.shape
    winners = draw(p.float(), e)
    n = (draft == winners[:, :K]).long().cumprod(-1).sum(-1)
    positions = torch.arange(K + 1, device=p.device)
    tokens = torch.where(positions < n[:, None], winners, -1)
    tokens[torch.arange(B, device=p.device), n] = winners[torch.arange(B, device=p.device), n]
    return tokens, n


def random_inputs(B, K, V, generator=None, device="cpu", one_hot=False):
    """The uniforms u [B, K] and exponentials e [B, V] that one rejection_sample call consumes."""
    u = torch.rand(B, K, generator=generator, device=device)
    return u, exponentials(B, V, generator=generator, device=device, one_hot=one_hot)


def check_inputs(p, q, draft, u, e):
    """Raise SamplerError unless the inputs follow the contract."""
    if p.dim() != 3 or q.dim() != 3 or draft.dim() != 2:
        raise SamplerError("expected p [B,K+1,V], q [B,K,V], draft [B,K]")
    B, K1, V = p.shape
    K = K1 - 1
    if K < 1:
        raise SamplerError(f"K must be at least 1, got {K}")
    if q.shape != (B, K, V) or draft.shape != (B, K) or u.shape != (B, K) or e.shape != (B, V):
        raise SamplerError(f"shapes disagree: p {tuple(p.shape)}, q {tuple(q.shape)}, draft {tuple(draft.shape)}, "
                           f"u {tuple(u.shape)}, e {tuple(e.shape)}")
    if draft.min() < 0 or draft.max() >= V:
        raise SamplerError(f"draft token ids must lie in [0, {V}), got [{int(draft.min())}, {int(draft.max())}]")
    check_probs(target=p, draft=q)


def check_probs(**named):
    """Raise SamplerError where a distribution (None: not given) holds a NaN or a negative number."""
    for name, x in named.items():
        if x is not None and torch.isnan(x).any():
            raise SamplerError(f"NaN in the {name} probabilities")
        if x is not None and (x < 0).any():
            raise SamplerError(f"negative {name} probabilities")


def rejection_sample(p, q, draft, u, e, impl="auto"):
    """Check the inputs, then run the chosen implementation ('auto': cuda on a GPU, else torch)."""
    check_inputs(p, q, draft, u, e)
    return IMPLEMENTATIONS[default_impl(p) if impl == "auto" else impl](p, q, draft, u, e)


def default_impl(p):
    """'cuda' for probabilities on a GPU where the kernel builds, else 'torch'."""
    return "cuda" if p.is_cuda and cuda_extension() is not None else "torch"


def reference(p, q, draft, u, e):
    """The plain loop over rows and positions (the seed report's baseline, with exact residuals)."""
    B, K = draft.shape
    tokens = torch.full((B, K + 1), -1, dtype=torch.long, device=p.device)
    n = torch.zeros(B, dtype=torch.long, device=p.device)
    for b in range(B):
        for i in range(K):
            x = draft[b, i]
            if u[b, i] * q[b, i, x].float() < p[b, i, x].float():
                tokens[b, i] = x
                n[b] += 1
                continue
            residual = (p[b, i].float() - q[b, i].float()).clamp_min(0)
            if not (residual > 0).any():                     # p == q up to rounding: the residual is p
                residual = p[b, i].float()
            tokens[b, i] = draw(residual, e[b])
            break
        else:
            tokens[b, K] = draw(p[b, K].float(), e[b])
    return tokens, n


def vectorised(p, q, draft, u, e):
    """The same decisions for all rows at once: no Python loop over B or K, any device.
    Reads only the K accept-test entries and, per row, the two rows at its first rejection."""
    B, K = draft.shape
    rows = torch.arange(B, device=p.device)
    px = p[:, :K].gather(-1, draft.unsqueeze(-1)).squeeze(-1).float()
    qx = q.gather(-1, draft.unsqueeze(-1)).squeeze(-1).float()
    n = (u * qx < px).long().cumprod(-1).sum(-1)            # index of the first rejection, or K
    qn = q[rows, n.clamp(max=K - 1)].float()
    qn[n == K] = 0                                          # no q for the bonus draw
    race = (p[rows, n].float() - qn).clamp_(min=0).div_(e)  # residual r / E, in place
    winner = race.argmax(-1)
    empty = race.gather(-1, winner.unsqueeze(-1)).squeeze(-1) == 0    # r == 0 everywhere: p == q up to rounding
    if empty.any():
        winner[empty] = draw(p[rows[empty], n[empty]].float(), e[empty])
    positions = torch.arange(K + 1, device=p.device)
    tokens = torch.where(positions[:K] < n.unsqueeze(-1), draft, -1)
    tokens = torch.cat((tokens, torch.full((B, 1), -1, dtype=torch.long, device=p.device)), dim=1)
    tokens[rows, n] = winner
    return tokens, n


def cuda_extension():
    """sampler.cu, built on first use (linears.compiled), or None."""
    return compiled("sampler.cu", "the rejection sampler runs in vectorised torch", name="specdecode_sampler",
                    why_not=None if torch.cuda.is_available() else "no CUDA device", extra_cuda_cflags=["-O3"])


def cuda(p, q, draft, u, e):
    """sampler.cu: one block per row, warp-shuffle argmax of the exponential race."""
    ext = cuda_extension()
    if ext is None or not p.is_cuda:
        raise SamplerError("the cuda sampler needs a CUDA device and the compiled kernel")
    tokens, n = ext.rejection_sample(p.contiguous(), q.contiguous(), draft.contiguous(), u.float().contiguous(),
                                     e.float().contiguous(), torch.cuda.current_stream().cuda_stream)
    return tokens, n


MAX_CANDIDATES = 16        # a node's candidates, at most: sampler.cu's tree kernel holds them in one array of 16


def check_tree_inputs(p, q, candidates, u, e, point):
    """Raise SamplerError unless the inputs follow the tree contract (see tree_sample)."""
    if p.dim() != 2 or candidates.dim() != 2:
        raise SamplerError("expected p [R,V] and candidates [R,m]")
    R, V = p.shape
    if ((q is not None and q.shape != (R, V)) or candidates.shape[0] != R or u.shape != candidates.shape
            or e.shape != (V,) or (point is not None and point.shape != candidates.shape)):
        raise SamplerError(f"shapes disagree: p {tuple(p.shape)}, q {None if q is None else tuple(q.shape)}, "
                           f"candidates {tuple(candidates.shape)}, u {tuple(u.shape)}, e {tuple(e.shape)}, "
                           f"point {None if point is None else tuple(point.shape)}")
    if candidates.shape[1] > MAX_CANDIDATES:
        raise SamplerError(f"at most {MAX_CANDIDATES} candidates a node (sampler.cu), got {candidates.shape[1]}")
    if candidates.numel() and (candidates.min() < -1 or candidates.max() >= V):
        raise SamplerError(f"candidate token ids must lie in [0, {V}) (or -1 for none)")
    check_probs(target=p, draft=q)


def tree_sample(p, q, candidates, u, e, point=None, impl="auto"):
    """SpecInfer's multi-round rejection sampling at R nodes of a token tree (one row each).

    Row i is one node: p [R, V] the target's probabilities there; candidates [R, m] the
    child tokens proposed, in the order they were made (-1 pads); q [R, V] the draft
    distribution the drawn ones were drawn from i.i.d.; point [R, m] (bool) marks the
    candidates that are point masses instead, chosen deterministically (top-k picks,
    lookup tokens): proposed with probability 1. q = None: every candidate is a point mass
    (point is then not needed). u [R, m] uniforms; e [V] exponentials, shared by the rows
    (a step emits the residual draw of one node only).

    Every round uses its own candidate's proposal, which keeps a mix exact. For j = 1..m,
    with r the current residual (r = p at first) and z = sum(r):
      drawn c_j:  accept with probability min(1, r(c_j) / (z q(c_j))), i.e. when
                  u_j q(c_j) z < r(c_j); on rejection r <- max(0, r / z - q);
      point c_j:  the same with q = the point mass on c_j: accept when u_j z < r(c_j); on
                  rejection r <- r with r(c_j) = 0;
    a step that would leave nothing is skipped (p == q up to rounding). If all are rejected,
    the token is drawn from r by the exponential race. Either way it is distributed exactly
    as p. z is summed in float64, so every implementation takes the same decisions.

    Returns choice [R] (j of the accepted candidate, or -1) and token [R] (c_j, or the draw)."""
    check_tree_inputs(p, q, candidates, u, e, point)
    if q is None or point is None:
        point = torch.full(candidates.shape, q is None, dtype=torch.bool, device=p.device)
    return TREE_IMPLEMENTATIONS[default_impl(p) if impl == "auto" else impl](p, q, candidates, u, e, point)


def tree_reference(p, q, candidates, u, e, point):
    """The loop, node by node and candidate by candidate."""
    R, m = candidates.shape
    choice = torch.full((R,), -1, dtype=torch.long, device=p.device)
    token = torch.empty(R, dtype=torch.long, device=p.device)
    for i in range(R):
        r = p[i].float()
        for j, x in enumerate(candidates[i].tolist()):
            if x < 0:
                break
            z = r.sum(dtype=torch.float64).float()
            qx = 1.0 if point[i, j] else q[i, x].float()
            if u[i, j] * qx * z < r[x]:
                choice[i], token[i] = j, x
                break
            if point[i, j]:
                nxt = r.clone()
                nxt[x] = 0.0
            else:
                nxt = (r / z - q[i].float()).clamp_min(0)
            if (nxt > 0).any():
                r = nxt
        if choice[i] < 0:
            token[i] = draw(r, e)
    return choice, token


def tree_vectorised(p, q, candidates, u, e, point):
    """The same decisions for all nodes at once: a loop over the m candidate rounds only,
    each on the rows still undecided."""
    R, m = candidates.shape
    r = p.float().clone()
    choice = torch.full((R,), -1, dtype=torch.long, device=p.device)
    o = torch.arange(R, device=p.device)                   # rows with no candidate accepted yet
    for j in range(m):
        o = o[candidates[o, j] >= 0]
        if len(o) == 0:
            break
        x, pt = candidates[o, j], point[o, j]
        z = r[o].sum(-1, dtype=torch.float64).float()
        qx = torch.ones(len(o), device=p.device) if q is None else torch.where(pt, 1.0, q[o, x].float())
        accept = u[o, j] * qx * z < r[o, x]
        choice[o[accept]] = j
        o, x, z, pt = o[~accept], x[~accept], z[~accept], pt[~accept]
        nxt = r[o]                                         # (a copy: advanced indexing)
        if q is not None and not pt.all():
            nxt = torch.where(pt[:, None], nxt, (nxt / z[:, None] - q[o].float()).clamp_min(0))
        zero = torch.arange(len(o), device=p.device)[pt]
        nxt[zero, x[pt]] = 0.0
        left = nxt.amax(-1) > 0                           # (r >= 0: cheaper than any(nxt > 0))
        r[o[left]] = nxt[left]
    rejected = choice < 0
    token = torch.empty(R, dtype=torch.long, device=p.device)
    token[~rejected] = candidates[~rejected, choice[~rejected]]
    token[rejected] = draw(r[rejected], e)                  # (every row when there are no candidates, m = 0)
    return choice, token


def tree_cuda(p, q, candidates, u, e, point):
    """sampler.cu's tree kernel: one block per node, float64 block sums, warp-shuffle argmax."""
    ext = cuda_extension()
    if ext is None or not p.is_cuda:
        raise SamplerError("the cuda sampler needs a CUDA device and the compiled kernel")
    q = q.contiguous() if q is not None else torch.empty(0, dtype=p.dtype, device=p.device)
    return ext.tree_sample(p.contiguous(), q, candidates.contiguous(), u.float().contiguous(), e.float().contiguous(),
                           point.to(torch.uint8).contiguous(), torch.cuda.current_stream().cuda_stream)


IMPLEMENTATIONS = {"reference": reference, "torch": vectorised, "cuda": cuda}
TREE_IMPLEMENTATIONS = {"reference": tree_reference, "torch": tree_vectorised, "cuda": tree_cuda}
