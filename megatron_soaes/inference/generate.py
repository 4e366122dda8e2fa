"""Target-only decoding with the inference model's KV cache: prefill, one token per forward,
greedy or sampled (temperature, top-p). The reference speculative decoding must reproduce, and
what evaluation and export checks generate with."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from megatron_soaes.inference.model import Qwen2ForInference


@dataclass
class GenerationResult:
    tokens: list[list[int]]
    seconds: float
    target_forwards: int
    new_tokens: int
    accepted_per_round: list[float] = field(default_factory=list)  # accepted draft tokens, mean over batch
    tree_depth: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)

    @property
    def tau(self) -> float:
        """Mean tokens emitted per target forward (accepted drafts + the target's own token)."""
        return 1.0 + sum(self.accepted_per_round) / max(len(self.accepted_per_round), 1)

    @property
    def alpha(self) -> float:
        """Acceptance rate: accepted draft tokens per drafted depth level."""
        if not self.accepted_per_round or not self.tree_depth:
            return 0.0
        return sum(self.accepted_per_round) / (len(self.accepted_per_round) * self.tree_depth)


def probs_from_logits(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0) -> torch.Tensor:
    """The sampling distribution: one-hot argmax at temperature 0, else softmax(l/T) cut to top-p."""
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    p = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = p.sort(-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p  # the smallest prefix with mass >= top_p
        p = torch.zeros_like(p).scatter_(-1, si, sp * keep)
        p = p / p.sum(-1, keepdim=True)
    return p


def sample(p: torch.Tensor, gen) -> torch.Tensor:
    return torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=gen).view(p.shape[:-1])


def prefill(model: Qwen2ForInference, prompts: list[list[int]], max_len: int):
    """Cache every prompt token but the last, which becomes the first root."""
    B = len(prompts)
    cache = model.new_cache(B, max_len)
    n = max(len(p) for p in prompts) - 1
    if n > 0:
        toks = torch.zeros(B, n, dtype=torch.long)
        for b, p in enumerate(prompts):
            toks[b, :len(p) - 1] = torch.tensor(p[:-1])
        toks = toks.to(model.device)
        model.forward(toks, torch.arange(n, device=model.device).expand(B, n), cache, capture=False)  # once per request
    cache.lengths.copy_(torch.tensor([len(p) - 1 for p in prompts]))
    root = torch.tensor([p[-1] for p in prompts], device=model.device)
    return cache, root


def check_prompts(prompts, max_new_tokens, model):
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    bad = [t for p in prompts for t in p if not 0 <= t < model.vocab_size]
    if bad:
        raise ValueError(f"prompt token {bad[0]} is outside the vocabulary of {model.vocab_size}")


def finish(out: list[list[int]], max_new_tokens: int, eos_id: int | None) -> list[list[int]]:
    res = []
    for seq in out:
        seq = seq[:max_new_tokens]
        if eos_id is not None and eos_id in seq:
            seq = seq[:seq.index(eos_id) + 1]
        res.append(seq)
    return res


def row_done(seq: list[int], max_new_tokens: int, eos_id: int | None) -> bool:
    return len(seq) >= max_new_tokens or (eos_id is not None and eos_id in seq)


def all_done(out, max_new_tokens, eos_id) -> bool:
    return all(row_done(s, max_new_tokens, eos_id) for s in out)


@torch.no_grad()
def generate(target: Qwen2ForInference, prompts: list[list[int]], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
             stop=None, repetition_penalty: float = 1.0) -> GenerationResult:
    """Target-only decoding, one token per forward: the baseline and the lossless reference. `stop(tokens)`,
    when given, ends the batch early once it holds for every row not ended by EOS or the budget (rows it
    ended may carry a few tokens past that point). `repetition_penalty` > 1 (CTRL's, as in transformers, over
    the tokens this call generated, not the prompt's) makes a token already said less likely: an evaluation
    setting; the lossless speculative reference stays plain greedy."""
    check_prompts(prompts, max_new_tokens, target)
    gen = torch.Generator(device=target.device).manual_seed(seed)
    t0 = time.perf_counter()
    B = len(prompts)
    cache, root = prefill(target, prompts, max(map(len, prompts)) + max_new_tokens + 1)
    out: list[list[int]] = [[] for _ in range(B)]
    forwards = 0
    stopped = [False] * B

    def done(b):
        if not stopped[b] and stop is not None and out[b]:
            stopped[b] = bool(stop(out[b]))
        return stopped[b] or row_done(out[b], max_new_tokens, eos_id)

    while not all(done(b) for b in range(B)):
        logits = target.forward(root[:, None], cache.lengths[:, None], cache)[:, 0]
        if repetition_penalty != 1.0 and out[0]:
            said = torch.tensor(out, device=logits.device)
            seen = logits.gather(-1, said)
            logits = logits.scatter(-1, said, torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty))
        forwards += 1
        cache.lengths += 1
        root = logits.argmax(-1) if temperature <= 0 else sample(probs_from_logits(logits, temperature, top_p), gen)
        for b in range(B):
            out[b].append(int(root[b]))
    res = finish(out, max_new_tokens, eos_id)
    return GenerationResult(res, time.perf_counter() - t0, forwards, sum(map(len, res)))
