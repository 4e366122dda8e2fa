"""The reduced draft vocabulary (EAGLE-3's d2t / t2d, FR-Spec): the draft scores only the K tokens the
target says most often; verification still scores the whole vocabulary, so decoding stays lossless
(a token outside the K is never drafted, only emitted by the target)."""

from __future__ import annotations

import numpy as np
import torch


def draft_vocabulary(labels, mask, k: int, vocab_size: int) -> torch.Tensor:
    """The `k` most frequent label tokens under `mask` (ties: the smaller id), in increasing id order,
    as a LongTensor of target ids. Tokens never seen fill the rest in id order, so k may exceed the
    number of distinct tokens."""
    labels, mask = np.asarray(labels).reshape(-1), np.asarray(mask).reshape(-1) > 0
    counts = np.bincount(labels[mask], minlength=vocab_size)[:vocab_size]
    order = np.lexsort((np.arange(vocab_size), -counts))  # count descending, then id ascending
    return torch.from_numpy(np.sort(order[:k])).long()


def d2t_t2d(ids: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EAGLE-3's tensors: d2t[i] = target id of draft id i minus i (offsets), t2d[v] = whether target
    id v is in the draft vocabulary."""
    d2t = ids - torch.arange(len(ids))
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return d2t, t2d


def ids_from_d2t(d2t: torch.Tensor) -> torch.Tensor:
    return d2t.long() + torch.arange(len(d2t))


def coverage(ids: torch.Tensor, labels, mask) -> float:
    """Share of the masked label tokens inside the draft vocabulary."""
    labels, mask = np.asarray(labels).reshape(-1), np.asarray(mask).reshape(-1) > 0
    inside = np.zeros(int(max(labels.max(initial=0), int(ids.max())) + 1), dtype=bool)
    inside[ids.numpy()] = True
    sel = labels[mask]
    return float(inside[sel].mean()) if sel.size else 0.0
