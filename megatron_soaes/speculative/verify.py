"""Lossless token-tree verification: the PyTorch reference and the native op (csrc/).

Conventions (shared with csrc/tree_verify.h): node 0 is the root, the last emitted token;
``parents[b, i] < i``; siblings are tried in index order. ``draft_probs[b, i]`` is the distribution
node i's token was drawn from, given the siblings tried before it (SpecInfer/RSD style), or an empty
tensor when every draft token was chosen deterministically (greedy, top-k, EAGLE-2 style
expansion: q is then one-hot). ``uniforms[b, i, 0]`` decides whether node i is accepted,
``uniforms[b, i, 1]`` samples the next token when the walk stops at node i.

Accepting x with probability min(1, p(x)/q(x)) and replacing p by norm(max(0, p - q)) after each
rejected sibling emits tokens distributed exactly as p, sibling after sibling (checking each
root-to-leaf path independently is not lossless). The residual is kept unnormalised (r, S = sum r)
so the test is ``u * q(x) * S < r(x)``. Greedy decoding is the same walk with one-hot target
probabilities: a child is accepted iff it is the target's argmax.
"""

from __future__ import annotations

import warnings

import torch

_native = None


def native_available(device: str = "cpu") -> bool:
    global _native
    if _native is None:
        try:
            from megatron_soaes import _C  # noqa: F401  (loading registers torch.ops.soaes.*)

            _native = _C
        except ImportError:
            _native = False
    if not _native:
        return False
    return device == "cpu" or bool(getattr(_native, "with_cuda", False))


def tree_verify_reference(parents, tokens, target_probs, draft_probs, uniforms):
    """Pure PyTorch oracle (float64 arithmetic). Returns (path [B, N] padded with -1, length [B], next [B])."""
    B, N, V = target_probs.shape
    path = torch.full((B, N), -1, dtype=torch.long)
    length = torch.zeros(B, dtype=torch.long)
    nxt = torch.zeros(B, dtype=torch.long)
    has_q = draft_probs is not None and draft_probs.numel() > 0
    par, tok, u = parents.cpu(), tokens.cpu(), uniforms.cpu().double()
    p_all = target_probs.cpu()
    q_all = draft_probs.cpu() if has_q else None
    for b in range(B):
        node, path[b, 0], n = 0, 0, 1
        r = p_all[b, 0].double().clone()
        S = r.sum()
        while True:
            accepted = -1
            for c in (par[b] == node).nonzero().flatten().tolist():
                if c <= node:
                    continue
                x = int(tok[b, c])
                if not 0 <= x < V:
                    raise ValueError(f"token {x} of node {c} is outside the vocabulary")
                qx = q_all[b, c, x].double() if has_q else 1.0
                if u[b, c, 0] * qx * S < r[x]:
                    accepted = c
                    break
                if has_q:
                    r = (r - S * q_all[b, c].double()).clamp_(min=0)
                    S = r.sum()
                else:
                    S = S - r[x]
                    r[x] = 0
                if not S > 0:
                    r = p_all[b, node].double().clone()
                    S = r.sum()
            if accepted < 0:
                break
            path[b, n], n, node = accepted, n + 1, accepted
            r = p_all[b, node].double().clone()
            S = r.sum()
        length[b] = n
        target = u[b, node, 1] * S
        pos = r > 0
        csum = torch.cumsum(r, 0)
        hit = ((csum > target) & pos).nonzero()
        nxt[b] = hit[0, 0] if len(hit) else pos.nonzero()[-1, 0]
    return path, length, nxt


def _validate(parents, tokens, target_probs, draft_probs, uniforms) -> None:
    """Clear errors in Python (the native op checks too, but an exception thrown from a C++ extension
    built with another compiler than torch's can crash the process instead of raising)."""
    if target_probs.dim() != 3:
        raise ValueError(f"target_probs must be [B, N, V], got shape {list(target_probs.shape)}")
    B, N, V = target_probs.shape
    if parents.shape != (B, N) or tokens.shape != (B, N):
        raise ValueError(f"parents and tokens must be [B, N] = [{B}, {N}], got {list(parents.shape)} and {list(tokens.shape)}")
    if uniforms.shape != (B, N, 2):
        raise ValueError(f"uniforms must be [B, N, 2] = [{B}, {N}, 2], got {list(uniforms.shape)}")
    if draft_probs.numel() and draft_probs.shape != target_probs.shape:
        raise ValueError(f"draft_probs must be empty or {list(target_probs.shape)}, got {list(draft_probs.shape)}")
    if N > 1:
        drafted = tokens[:, 1:]
        if bool(((drafted < 0) | (drafted >= V)).any()):
            raise ValueError(f"a draft token is outside the vocabulary of {V}")
        idx = torch.arange(1, N, device=parents.device)
        if bool(((parents[:, 1:] < 0) | (parents[:, 1:] >= idx)).any()):
            raise ValueError("parents[b, i] must satisfy 0 <= parents[b, i] < i for every non-root node")


def tree_verify(parents, tokens, target_probs, draft_probs=None, uniforms=None, *, generator=None,
                implementation: str = "auto"):
    """Verify a batch of token trees. implementation: auto (native when built) | native | reference."""
    B, N, _ = target_probs.shape
    dev = target_probs.device
    if uniforms is None:
        uniforms = torch.rand((B, N, 2), generator=generator, device=generator.device if generator else dev)
    if draft_probs is None:
        draft_probs = torch.empty(0, device=dev)
    args = (parents.long().contiguous(), tokens.long().contiguous(), target_probs.float().contiguous(),
            draft_probs.float().contiguous(), uniforms.float().to(dev).contiguous())
    _validate(*args)
    if implementation == "reference":
        return tree_verify_reference(*args)
    if native_available(dev.type):
        return torch.ops.soaes.tree_verify(*args)
    if implementation == "native":
        raise RuntimeError(f"the native tree_verify op is not built for {dev.type} "
                           "(pip install --no-build-isolation -e . with torch installed; nvcc for CUDA)")
    warnings.warn("native tree_verify op not built; using the PyTorch reference", stacklevel=2)
    out = tree_verify_reference(*args)
    return tuple(t.to(dev) for t in out)
