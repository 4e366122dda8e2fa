"""Speculative (chain / static tree / dynamic tree) decoding on top of `inference`.

One round of speculative decoding, for a batch:
  1. the draft grows a token tree from the root (the last emitted token) depth by depth, each depth
     one draft forward over that depth's nodes with a tree mask (`draft_tree`);
  2. the target scores the whole tree in ONE forward (tree mask, position = length + depth);
  3. `tree_verify` (native op) walks it: accepted path + the next token, lossless;
  4. both KV caches are compacted to the accepted path; the next token becomes the new root.

The draft is a `Drafter`: a separate draft model (`ModelDrafter`, its own KV cache over every emitted
token) or an EAGLE-3 head (`HeadDrafter`, fed the target's hidden states of verified tokens and its own
of drafted ones). Both may score a reduced draft vocabulary; verification always scores the whole one.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_soaes.inference.generate import (GenerationResult, all_done, check_prompts, finish, prefill,
                                                probs_from_logits, row_done, sample)
from megatron_soaes.inference.model import Qwen2ForInference
from megatron_soaes.models.config import check_same_family
from megatron_soaes.speculative.verify import tree_verify


@dataclass
class SpecConfig:
    """chain: gamma tokens; tree: top-k `branching[d]` children per node at depth d (sampled without
    replacement when temperature > 0); dynamic: EAGLE-2-style expansion of the `topk` most probable
    nodes per depth (cumulative draft probability) for `depth` levels, keeping the best `budget` nodes."""

    mode: Literal["chain", "tree", "dynamic"] = "chain"
    gamma: int = 4
    branching: tuple[int, ...] = (2, 2, 1, 1)
    topk: int = 4
    depth: int = 5
    budget: int = 16

    def __post_init__(self):
        if self.mode == "chain":
            self.branching = (1,) * self.gamma
        if self.mode not in ("chain", "tree", "dynamic"):
            raise ValueError(f"unknown speculative mode {self.mode!r}")
        if any(k < 1 for k in self.branching) or self.gamma < 1 or self.topk < 1 or self.depth < 1 or self.budget < 2:
            raise ValueError("gamma, branching factors, topk, depth >= 1 and budget >= 2 are required")

    @classmethod
    def parse(cls, tree: str | None, gamma: int = 4, topk: int = 4, depth: int = 5, budget: int = 16) -> "SpecConfig":
        """CLI form: no tree -> chain of `gamma`; "3,2,1" -> static branching; "dynamic[:topk,depth,budget]"
        -> EAGLE-2 style."""
        if not tree or tree == "chain":
            return cls("chain", gamma=gamma)
        if tree == "dynamic":
            return cls("dynamic", topk=topk, depth=depth, budget=budget)
        if tree.startswith("dynamic:"):  # dynamic:topk,depth,budget
            try:
                k, d, b = (int(x) for x in tree.split(":", 1)[1].split(","))
            except ValueError:
                raise ValueError(f"--tree dynamic:TOPK,DEPTH,BUDGET, e.g. dynamic:2,4,8; got {tree!r}") from None
            return cls("dynamic", topk=k, depth=d, budget=b)
        try:
            branching = tuple(int(x) for x in tree.split(","))
        except ValueError:
            raise ValueError(f"--tree must be 'chain', 'dynamic' or branching factors like 3,2,1; got {tree!r}") from None
        return cls("tree", branching=branching)

    @property
    def max_nodes(self) -> int:
        if self.mode == "dynamic":
            return self.budget
        n, width = 1, 1
        for k in self.branching:
            width *= k
            n += width
        return n


@dataclass
class DraftTree:
    parents: torch.Tensor  # [B, N]
    tokens: torch.Tensor  # [B, N]
    depth: torch.Tensor  # [B, N]
    draft_probs: torch.Tensor | None  # [B, N, V] or None (deterministic drafts: one-hot)
    draft_slot: torch.Tensor  # [B, N] block slot of the node's K/V in the draft cache, -1 if never run
    anc: torch.Tensor  # [B, N, N]: node j is node i or one of its ancestors


def _ancestors(parents: torch.Tensor) -> torch.Tensor:
    B, N = parents.shape
    anc = torch.zeros(B, N, N, dtype=torch.bool, device=parents.device)
    ar = torch.arange(B, device=anc.device)
    for i in range(N):
        if i:
            anc[:, i] = anc[ar, parents[:, i].clamp(min=0)]
        anc[:, i, i] = True
    return anc


class ModelDrafter:
    """A separate draft model: its KV cache holds every emitted token."""

    feature_layers: tuple[int, ...] = ()

    def __init__(self, model: Qwen2ForInference):
        self.model, self.device, self.vocab_size = model, model.device, model.vocab_size

    def check(self, target: Qwen2ForInference) -> None:
        check_same_family(target.cfg, self.model.cfg)
        if self.vocab_size != target.vocab_size:
            raise ValueError(f"draft vocabulary {self.vocab_size} != target vocabulary {target.vocab_size}")

    def start(self, prompts: list[list[int]], size: int, features=None) -> None:
        self.cache, _ = prefill(self.model, prompts, size)
        self.pending = None  # [B] last accepted token not yet in the cache (fed with the next root)

    def root(self, root: torch.Tensor) -> torch.Tensor:
        """Draft logits [B, 1, V] for the root (K/V at block slot 0); a pending token is committed in the same forward."""
        m, cache, pending = self.model, self.cache, self.pending
        if pending is None:
            return m.forward(root[:, None], cache.lengths[:, None], cache)
        pos = cache.lengths[:, None] + torch.arange(2, device=root.device)
        logits = m.forward(torch.stack([pending, root], 1), pos, cache)
        cache.lengths += 1
        return logits[:, 1:]

    def step(self, tokens, depth: int, block_mask, write_offset: int) -> torch.Tensor:
        """Logits of `tokens` [B, n] at depth `depth`, K/V at block slots write_offset + j."""
        return self.model.forward(tokens, self.cache.lengths[:, None] + depth, self.cache, block_mask=block_mask,
                                  write_offset=write_offset)

    def accept(self, tree: "DraftTree", path, length, features=None) -> None:
        """Keep the written prefix of the accepted path; the last accepted node may not have been run."""
        B = path.shape[0]
        ar = torch.arange(B, device=path.device)
        pslot = tree.draft_slot.gather(1, path.clamp(min=0))
        in_path = torch.arange(path.shape[1], device=path.device)[None] < length[:, None]
        written = (pslot >= 0) & in_path
        dcount = written.sum(1)
        self.cache.commit(torch.where(written, pslot, -1), dcount)
        need = dcount < length
        self.pending = None
        if need.any():
            last = tree.tokens[ar, path[ar, (length - 1).clamp(min=0)]]
            if bool(need.all()):
                self.pending = last  # goes through the draft together with the next root: one forward saved
            else:
                self.model.forward(last[:, None], self.cache.lengths[:, None], self.cache)
                self.cache.lengths += need.long()

    def predictions(self, target, seq: list[int]) -> list[int]:
        """Teacher-forced greedy tokens: entry i predicts seq[i + 1]."""
        n = len(seq)
        x = torch.tensor([seq], device=self.device)
        logits = self.model.forward(x, torch.arange(n, device=self.device)[None], self.model.new_cache(1, n), capture=False)
        return logits[0].argmax(-1).tolist()


class HeadDrafter:
    """An EAGLE-3 head (`heads.inference`). Its cache slot t holds token t + 1 with the target's fused
    feature of position t, so the root (the last emitted token) needs the feature of the token before it.
    Drafted nodes read the head's own output at their parent; once the target has verified a path, those
    tokens are run again with the target's features (the next round's root forward), as EAGLE does."""

    def __init__(self, head):
        self.head, self.device, self.vocab_size = head, head.device, head.vocab_size
        self.feature_layers = tuple(head.hcfg.feature_layers)

    def check(self, target: Qwen2ForInference) -> None:
        from megatron_soaes.heads.inference import check_head

        check_head(self.head.hcfg, target.cfg, "draft head")

    def start(self, prompts: list[list[int]], size: int, features: torch.Tensor) -> None:
        """`features` [B, n, 3d]: the target's, from prefilling every prompt token but the last."""
        if any(len(p) < 2 for p in prompts):
            raise ValueError("an EAGLE-3 head drafts from the target's hidden state of the token before the root: "
                             "every prompt needs at least 2 tokens")
        h, B = self.head, len(prompts)
        dev = self.device
        self.cache = h.new_cache(B, size)
        g = h.fuse(features)
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        n = int(lens.max()) - 2
        if n > 0:
            toks = torch.zeros(B, n, dtype=torch.long, device=dev)
            for b, p in enumerate(prompts):
                toks[b, :len(p) - 2] = torch.tensor(p[1:-1])
            h.hidden_in = g[:, :n]
            h.forward(toks, torch.arange(n, device=dev).expand(B, n), self.cache, capture=False)
        self.cache.lengths.copy_(lens - 2)
        ar = torch.arange(B, device=dev)
        self.root_hidden = g[ar, lens - 2]
        self.pend_tokens = torch.zeros(B, 0, dtype=torch.long, device=dev)
        self.pend_hidden = g.new_zeros(B, 0, g.shape[-1])
        self.pend_count = torch.zeros(B, dtype=torch.long, device=dev)
        self.block_hidden = g.new_zeros(B, size, g.shape[-1])  # the head's outputs at this round's block slots

    def root(self, root: torch.Tensor) -> torch.Tensor:
        """Runs the tokens verified last round (with the target's features) and the root in one forward; commits
        the former, so the root's K/V end at block slot 0."""
        h, cache, k = self.head, self.cache, self.pend_count
        B, dev = root.shape[0], self.device
        ar = torch.arange(B, device=dev)
        width = int(k.max()) + 1
        toks = torch.zeros(B, width, dtype=torch.long, device=dev)
        hid = self.root_hidden.new_zeros(B, width, self.root_hidden.shape[-1])
        toks[:, :width - 1], hid[:, :width - 1] = self.pend_tokens[:, :width - 1], self.pend_hidden[:, :width - 1]
        toks[ar, k], hid[ar, k] = root, self.root_hidden
        h.hidden_in = hid
        logits = h.forward(toks, cache.lengths[:, None] + torch.arange(width, device=dev), cache)
        cache.commit(torch.arange(width - 1, device=dev).expand(B, width - 1), k)
        self.block_hidden[:, 0] = h.hidden_out[ar, k]
        return logits[ar, k][:, None]

    def step(self, tokens, depth: int, block_mask, write_offset: int) -> torch.Tensor:
        h = self.head
        B, n = tokens.shape
        dev = self.device
        ar = torch.arange(B, device=dev)
        slots = write_offset + torch.arange(n, device=dev)
        if block_mask is None:  # a chain: each node's parent is the slot before it
            parent = (slots - 1).expand(B, n)
        else:  # the parent is the deepest ancestor: the largest visible slot before the node's own
            cols = torch.arange(block_mask.shape[-1], device=dev)
            visible = block_mask & (cols[None, None, :] < slots[None, :, None])
            parent = torch.where(visible, cols, -1).amax(-1)
        h.hidden_in = self.block_hidden[ar[:, None], parent.clamp(min=0)]
        logits = h.forward(tokens, self.cache.lengths[:, None] + depth, self.cache, block_mask=block_mask,
                           write_offset=write_offset)
        self.block_hidden[ar[:, None], slots.expand(B, n)] = h.hidden_out
        return logits

    def accept(self, tree: "DraftTree", path, length, features: torch.Tensor) -> None:
        """Commit the root (its feature was the target's); the accepted nodes after it, and the next root, wait
        for the next round with the target's features of the positions before them."""
        B, dev = path.shape[0], self.device
        ar = torch.arange(B, device=dev)
        self.cache.commit(torch.zeros(B, 1, dtype=torch.long, device=dev), (length > 0).long())
        p = path.clamp(min=0)
        g_path = self.head.fuse(features[ar[:, None], p])  # the target's fused features along the path only
        self.pend_tokens = tree.tokens.gather(1, p)[:, 1:]
        self.pend_hidden = g_path[:, :-1]
        self.pend_count = (length - 1).clamp(min=0)
        self.root_hidden = torch.where((length > 0)[:, None], g_path[ar, (length - 1).clamp(min=0)], self.root_hidden)

    def predictions(self, target, seq: list[int]) -> list[int]:
        """Teacher-forced: entry i predicts seq[i + 1] from the target's feature at i - 1 (entry 0: -1)."""
        n = len(seq)
        dev = self.device
        target.feature_layers = self.feature_layers
        try:
            target.forward(torch.tensor([seq], device=dev), torch.arange(n, device=dev)[None], target.new_cache(1, n),
                           capture=False)
            g = self.head.fuse(target.features)
        finally:
            target.feature_layers = ()
        if n < 2:
            return [-1] * n
        self.head.hidden_in = g[:, :n - 1]
        logits = self.head.forward(torch.tensor([seq[1:]], device=dev), torch.arange(n - 1, device=dev)[None],
                                   self.head.new_cache(1, n), capture=False)
        return [-1] + logits[0].argmax(-1).tolist()


def drafter_for(draft) -> "ModelDrafter | HeadDrafter":
    if isinstance(draft, (ModelDrafter, HeadDrafter)):
        return draft
    from megatron_soaes.heads.inference import Eagle3ForInference

    return HeadDrafter(draft) if isinstance(draft, Eagle3ForInference) else ModelDrafter(draft)


@functools.lru_cache(maxsize=32)
def _static_shape(branching: tuple[int, ...], device: str):
    """parents, depth, ancestor mask and per-depth node ranges of a static tree (same every round)."""
    parents, depth, levels, lo, hi = [-1], [0], [], 0, 1
    for d, k in enumerate(branching):
        for f in range(lo, hi):
            parents += [f] * k
            depth += [d + 1] * k
        levels.append((lo, hi))
        lo, hi = hi, len(parents)
    par = torch.tensor(parents, device=device)[None]
    return par, torch.tensor(depth, device=device)[None], _ancestors(par), levels


def _static_tree(draft, root, spec: SpecConfig, temperature, top_p, gen) -> DraftTree:
    B, dev = root.shape[0], draft.device
    par, dep, anc, levels = _static_shape(spec.branching, str(dev))
    N, V = par.shape[1], draft.vocab_size
    parents, depth, anc = par.expand(B, N), dep.expand(B, N), anc.expand(B, N, N)
    tokens = torch.zeros(B, N, dtype=torch.long, device=dev)
    sampled = temperature > 0
    qs = torch.zeros(B, N, V, device=dev) if sampled else None
    tokens[:, 0] = root
    nxt = 1
    for d, ((lo, hi), k) in enumerate(zip(levels, spec.branching)):
        if d == 0:
            logits = draft.root(root)
        else:  # a chain's node sees every node before it: causal, no mask needed
            chain = hi - lo == 1 and all(b == 1 for b in spec.branching[:d])
            logits = draft.step(tokens[:, lo:hi], d, None if chain else anc[:, lo:hi, :hi], lo)
        if not sampled:
            top = logits.topk(k, dim=-1).indices  # [B, hi - lo, k]: children in parent order
            tokens[:, nxt:nxt + (hi - lo) * k] = top.reshape(B, -1)
            nxt += (hi - lo) * k
            continue
        q = probs_from_logits(logits, temperature, top_p)
        for f in range(hi - lo):  # k siblings without replacement; node i records the q it was drawn from
            qf = q[:, f].clone()
            for _ in range(k):
                x = sample(qf, gen)
                tokens[:, nxt], qs[:, nxt] = x, qf
                qf = qf.scatter(1, x[:, None], 0.0)
                qf = qf / qf.sum(-1, keepdim=True).clamp(min=1e-30)
                nxt += 1
    slot = torch.arange(N, device=dev).expand(B, N).clone()
    slot[:, levels[-1][1]:] = -1  # the deepest level never went through the draft
    return DraftTree(parents, tokens, depth, qs, slot, anc)


def _dynamic_tree(draft, root, spec: SpecConfig) -> DraftTree:
    """EAGLE-2: expand the `topk` best nodes per depth by cumulative draft probability; keep the best `budget`."""
    B, dev, K = root.shape[0], draft.device, spec.topk
    cap = 1 + K + (spec.depth - 1) * K * K
    parents = torch.full((B, cap), -1, dtype=torch.long, device=dev)
    tokens = torch.zeros(B, cap, dtype=torch.long, device=dev)
    depth = torch.zeros(B, cap, dtype=torch.long, device=dev)
    score = torch.full((B, cap), -float("inf"), device=dev)
    anc = torch.zeros(B, cap, cap, dtype=torch.bool, device=dev)
    written = torch.zeros(B, cap, dtype=torch.bool, device=dev)
    ar = torch.arange(B, device=dev)
    tokens[:, 0], score[:, 0], anc[:, 0, 0] = root, 0.0, True
    frontier = torch.zeros(B, 1, dtype=torch.long, device=dev)  # candidate indices to expand
    n = 1
    for d in range(spec.depth):
        f = frontier.shape[1]
        logits = draft.root(root) if d == 0 else _forward_at_slots(draft, tokens, frontier, anc, d, n)
        written[:, int(frontier.min()):n] = True  # the whole block ran, each node under its own ancestors
        logp = torch.log_softmax(logits, -1)  # [B, f, V]
        top = logp.topk(K, dim=-1)
        cand_score = (score.gather(1, frontier)[:, :, None] + top.values).reshape(B, f * K)
        new = torch.arange(n, n + f * K, device=dev)
        tokens[:, new] = top.indices.reshape(B, f * K)
        parents[:, new] = frontier.repeat_interleave(K, dim=1)
        depth[:, new] = d + 1
        score[:, new] = cand_score
        for i in new.tolist():
            anc[:, i] = anc[ar, parents[:, i]]
            anc[:, i, i] = True
        n += f * K
        frontier = new[cand_score.topk(min(K, f * K), dim=-1).indices]
    # keep the `budget` best candidates (stable: a parent ties before its child); reindex in BFS order
    order = torch.sort(-score[:, :n], dim=-1, stable=True).indices[:, :spec.budget]
    keep = order.sort(dim=-1).values  # candidate indices, increasing: parents first
    remap = torch.full((B, n), -1, dtype=torch.long, device=dev)
    remap[ar[:, None], keep] = torch.arange(spec.budget, device=dev).expand(B, -1)
    par = parents.gather(1, keep)
    new_par = torch.where(par >= 0, remap.gather(1, par.clamp(min=0)), par)
    if (new_par[:, 1:] < 0).any():
        raise AssertionError("dynamic tree lost an ancestor")
    slot = torch.where(written.gather(1, keep), keep, torch.full_like(keep, -1))
    keep_anc = anc[ar[:, None, None], keep[:, :, None], keep[:, None, :]]
    return DraftTree(new_par, tokens.gather(1, keep), depth.gather(1, keep), None, slot, keep_anc)


def _forward_at_slots(draft, tokens, nodes, anc, d, n_written):
    """Draft forward of candidate `nodes` [B, f] (all at depth d), K/V at block slot = candidate index.

    Slots must equal candidate indices, so the forward covers the contiguous block
    [min(nodes), n_written) of depth-d candidates, each under its own ancestor mask.
    """
    B, f = nodes.shape
    ar = torch.arange(B, device=nodes.device)
    lo = int(nodes.min())
    block_tokens = tokens[:, lo:n_written]
    mask = anc[:, lo:n_written, :n_written]
    logits = draft.step(block_tokens, d, mask, lo)
    return logits[ar[:, None], nodes - lo]


@torch.no_grad()
def speculative_generate(target: Qwen2ForInference, draft, prompts: list[list[int]],
                         max_new_tokens: int, spec: SpecConfig | None = None, temperature: float = 0.0,
                         top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
                         verify_impl: str = "auto") -> GenerationResult:
    """`draft`: a draft model (`Qwen2ForInference`, full or reduced vocabulary), an EAGLE-3 head
    (`heads.inference.Eagle3ForInference`) or a `Drafter` wrapping either."""
    spec = spec or SpecConfig()
    check_prompts(prompts, max_new_tokens, target)
    draft = drafter_for(draft)
    draft.check(target)
    if draft.feature_layers and target.cuda_graphs:
        raise ValueError("an EAGLE-3 head reads the target's hidden states: run the target without cuda_graphs")
    target.feature_layers = draft.feature_layers  # what the head reads from every target forward
    try:
        return _generate(target, draft, prompts, max_new_tokens, spec, temperature, top_p, seed, eos_id, verify_impl)
    finally:
        target.feature_layers, target.features = (), None


def _generate(target, draft, prompts, max_new_tokens, spec, temperature, top_p, seed, eos_id, verify_impl):
    gen = torch.Generator(device=target.device).manual_seed(seed)
    t0 = time.perf_counter()
    B = len(prompts)
    tree_depth = spec.depth if spec.mode == "dynamic" else len(spec.branching)
    cap = spec.max_nodes if spec.mode != "dynamic" else 1 + spec.topk + (spec.depth - 1) * spec.topk ** 2
    # Cache sizes that cannot overflow: a row commits only while it is unfinished (fewer than
    # max_new_tokens emitted, no EOS), so its cache ends at most at len(prompt) - 1 + (max_new_tokens - 1)
    # + (tree_depth + 1) committed slots, and every forward writes at most one tree block past that.
    committed = max(map(len, prompts)) + max_new_tokens + tree_depth
    tcache, root = prefill(target, prompts, committed + spec.max_nodes)
    draft.start(prompts, committed + cap + 1, target.features)
    out: list[list[int]] = [[] for _ in range(B)]
    accepted_hist, forwards = [], 0
    while not all_done(out, max_new_tokens, eos_id):
        active = torch.tensor([not row_done(o, max_new_tokens, eos_id) for o in out], device=target.device)
        tree = (_dynamic_tree(draft, root, spec) if spec.mode == "dynamic"
                else _static_tree(draft, root, spec, temperature, top_p, gen))
        logits = target.forward(tree.tokens, tcache.lengths[:, None] + tree.depth, tcache, block_mask=tree.anc)
        forwards += 1
        p = probs_from_logits(logits, temperature, top_p)
        u = torch.rand(p.shape[:2] + (2,), generator=gen, device=p.device)
        path, length, nxt = tree_verify(tree.parents, tree.tokens, p, tree.draft_probs, u,
                                        implementation=verify_impl)
        path, length, nxt = path.to(target.device), length.to(target.device), nxt.to(target.device)
        length = length * active  # finished rows are frozen: nothing committed, nothing emitted
        tcache.commit(path, length)
        draft.accept(tree, path, length, target.features)
        for b, (toks, k) in enumerate(zip(tree.tokens.gather(1, path.clamp(min=0)).tolist(), length.tolist())):
            if k:
                out[b].extend(toks[1:k])
                out[b].append(int(nxt[b]))
        accepted_hist.append(float((length[active] - 1).float().mean()))
        root = torch.where(active, nxt, root)
    res = finish(out, max_new_tokens, eos_id)
    return GenerationResult(res, time.perf_counter() - t0, forwards, sum(map(len, res)), accepted_hist, tree_depth)
