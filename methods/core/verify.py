"""Acceptance: which drafted tokens the target keeps, greedy or sampled, with one host sync.

Greedy: the longest root-to-leaf path whose drafts equal the target's argmax at their
parents, plus the target's argmax after it (the bonus token); the output is exactly
greedy decoding's.

Sampling (temperature > 0): recursive rejection sampling over the tree, as SpecInfer and
EAGLE do it, so the output *distribution* is exactly the target's. Walking down from the
root, a node's children are tried in order; child x is accepted with probability
``min(1, p'(x) / q(x))``, where p' is the target distribution at the parent with the mass
of already rejected siblings removed. Most drafts here are deterministic (top-k of a head,
an n-gram lookup), i.e. q is a point mass: then the acceptance probability is
``p(x) / (1 - mass of the earlier siblings)`` and a rejection just removes x from p'. When
no child is accepted, the bonus token is drawn from the residual. A method whose drafts
are *sampled* (a draft model) passes its draft distributions ``q`` for chains, and gets
the rule of Leviathan et al. / Chen et al.: accept with ``min(1, p/q)``, else draw from
``norm(max(p - q, 0))``.

Everything is tensor work on the engine's device; the one host transfer per step is the
packed (length, bonus, path, tokens) vector the decode loop must read to continue.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from methods.core.tree import TreeLayout


@dataclass
class Acceptance:
    """One verified step: accepted node indices (root first), the new tokens (accepted drafts + bonus)."""

    nodes: list[int]
    tokens: list[int]
    nodes_t: torch.Tensor   # the same nodes on the device, for KV keeping and hidden-state gathers
    bonus_t: torch.Tensor   # [1] the bonus token on the device: the next step's root
    host_rows: list[int] = field(default_factory=list)  # greedy tokens of the rows a draft asked for

    @property
    def accepted_drafts(self) -> int:
        return len(self.nodes) - 1


def target_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The sampling distribution every method and vanilla share: softmax(logits / T), nucleus-filtered."""
    x = logits.float() / temperature
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        cum = torch.softmax(sorted_x, dim=-1).cumsum(dim=-1)
        drop_sorted = (cum - torch.softmax(sorted_x, dim=-1)) >= top_p  # keep the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return torch.softmax(x, dim=-1)


def _unpack(packed: torch.Tensor, depth: int, path: torch.Tensor, bonus: torch.Tensor,
            extra: torch.Tensor | None) -> Acceptance:
    """``packed`` = [length, bonus, path (depth + 1), path tokens (depth + 1)]; extra rows follow."""
    if extra is not None:
        packed = torch.cat([packed, extra])
    values = packed.tolist()  # the step's single host synchronisation
    length = int(values[0])
    nodes = [int(v) for v in values[2:2 + length + 1]]
    toks = values[2 + depth + 1:2 + 2 * (depth + 1)]
    tokens = [int(t) for t in toks[1:length + 1]] + [int(values[1])]
    return Acceptance(nodes, tokens, path[: length + 1], bonus.view(1), values[2 + 2 * (depth + 1):])


def accept_greedy(layout: TreeLayout, node_tokens: torch.Tensor, logits: torch.Tensor,
                  host_rows: torch.Tensor | None = None) -> Acceptance:
    greedy = logits.argmax(dim=-1)
    extra = None if host_rows is None else greedy[host_rows]
    if layout.n == 1:
        return _unpack(torch.stack([greedy.new_zeros(()), greedy[0], greedy.new_zeros(()), node_tokens[0]]),
                       0, greedy.new_zeros(1), greedy[0], extra)
    match = (node_tokens[layout.child] == greedy[layout.parent]) & layout.valid
    lengths = match.to(torch.int32).cumprod(dim=1).sum(dim=1)
    best = lengths.argmax()
    length = lengths[best].long()
    path = layout.retrieve[best].clamp(min=0)
    bonus = greedy[path].gather(0, length.view(1))[0]
    packed = torch.cat([length.view(1), bonus.view(1), path, node_tokens[path]])
    return _unpack(packed, layout.max_depth, path, bonus, extra)


def acceptance_probs(p_parent: torch.Tensor, rejected_mass: torch.Tensor, duplicate: torch.Tensor,
                     q_parent: torch.Tensor | None) -> torch.Tensor:
    """P(accept) of each node given its parent's target distribution (see the module docstring).

    Kept as its own function so a test can swap in a biased rule and watch the
    distribution test fail (the negative control).
    """
    if q_parent is not None:
        return torch.clamp(p_parent / q_parent.clamp_min(1e-20), max=1.0)
    prob = p_parent / (1.0 - rejected_mass).clamp_min(1e-12)
    return torch.where(duplicate, torch.zeros_like(prob), prob.clamp(max=1.0))


def accept_sampled(layout: TreeLayout, node_tokens: torch.Tensor, logits: torch.Tensor, temperature: float,
                   top_p: float, generator: torch.Generator, q: torch.Tensor | None = None,
                   host_rows: torch.Tensor | None = None) -> Acceptance:
    """Recursive rejection sampling; ``q`` [n, V]: the distribution each node's token was drawn from."""
    p = target_probs(logits, temperature, top_p)
    n, device = layout.n, logits.device
    parents = layout.parents
    cand = parents >= 0
    par = parents.clamp(min=0)
    p_parent = p[par, node_tokens] * cand
    earlier = layout.earlier_sibling
    rejected_mass = earlier.to(p.dtype) @ p_parent
    duplicate = (earlier & (node_tokens[None, :] == node_tokens[:, None])).any(dim=1)
    q_parent = None if q is None else q.float().gather(1, node_tokens[:, None])[:, 0]
    prob = acceptance_probs(p_parent, rejected_mass, duplicate, q_parent)
    u = torch.rand(n, generator=generator, device=device)
    accepted = (u < prob) & cand
    arange = torch.arange(n, device=device)
    none = torch.full((n,), n, dtype=torch.long, device=device)
    first_child = none.scatter_reduce(0, par, torch.where(accepted, arange, none), reduce="amin")
    cur = torch.zeros((), dtype=torch.long, device=device)
    length = torch.zeros((), dtype=torch.long, device=device)
    path = [cur]
    for _ in range(layout.max_depth):
        nxt = first_child[cur]
        moved = nxt < n
        cur = torch.where(moved, nxt, cur)
        length = length + moved.long()
        path.append(cur)
    path_t = torch.stack(path)
    residual = p[cur].clone()
    children = (parents == cur) & cand
    if q is None:  # point-mass drafts: every rejected child's token leaves the distribution
        keep = torch.where(children, 0.0, 1.0).to(residual.dtype)
        residual = residual.scatter_reduce(0, node_tokens, keep, reduce="prod")
    else:  # a sampled chain: at most one rejected child, whose q row proposed it
        child_q = (q.float() * children[:, None]).sum(dim=0)
        residual = torch.clamp(residual - child_q, min=0.0)
    total = residual.sum()
    residual = torch.where(total > 0, residual / total.clamp_min(1e-30), p[cur])
    bonus = torch.multinomial(residual, 1, generator=generator)[0]
    packed = torch.cat([length.view(1), bonus.view(1), path_t, node_tokens[path_t]])
    extra = None if host_rows is None else logits[host_rows].argmax(dim=-1)
    return _unpack(packed, layout.max_depth, path_t, bonus, extra)
