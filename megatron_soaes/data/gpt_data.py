"""Pre-training data: megatron-core GPTDatasets blended by weight, and a resumable batch iterator.

The blend (domain + general replay, with weights) is megatron-core's BlendedMegatronDatasetBuilder;
each sample carries the id of the source it came from, which the loop uses for per-source token
accounting. The iterator is a pure function of `consumed_samples`, so resume is exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class _MegatronTokenizerView:
    """What megatron's GPTDataset asks of a tokenizer (no `pad`: megatron then uses -1)."""

    eod: int
    vocab_size: int
    name: str = ""

    @property
    def unique_identifiers(self) -> dict:  # part of megatron's dataset cache key
        return {"class": "soaes", "name": self.name, "eod": self.eod, "vocab_size": self.vocab_size}


class _NoCacheNotice(logging.Filter):
    """Without data.cache_dir the dataset indexes are built in memory on purpose; megatron warns anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "because path_to_cache is None" not in record.getMessage()


def build_gpt_dataset(sources, num_samples: int, seq_length: int, tokenizer, seed: int, cache_dir=None):
    """A (possibly blended) GPTDataset over `sources` ([(prefix, weight)]) with `num_samples` samples."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    for name in ("megatron.core.datasets.blended_dataset", "megatron.core.datasets.gpt_dataset"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoCacheNotice) for f in logger.filters):
            logger.addFilter(_NoCacheNotice())

    prefixes = [p for p, _ in sources]
    weights = [float(w) for _, w in sources] if len(sources) > 1 else None
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=[(prefixes, weights), None, None],
        tokenizer=_MegatronTokenizerView(tokenizer.eod_id, tokenizer.vocab_size, tokenizer.name),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=str(cache_dir) if cache_dir else None,
        mid_level_dataset_surplus=0.005,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, None, None], lambda: True, config).build()
    return train


def scheduled_blend_index(weights, samples_per_step: int) -> tuple[np.ndarray, np.ndarray]:
    """Which source each global sample comes from, and its position within that source, for per-step
    weights `weights` ([steps, sources], rows summing to 1): each sample goes to the source furthest
    behind its cumulative target (megatron's blending rule, with a target that moves over the steps)."""
    steps, k = weights.shape
    n = steps * samples_per_step
    source, position = np.empty(n, dtype=np.int16), np.empty(n, dtype=np.int64)
    target, counts = np.zeros(k), np.zeros(k, dtype=np.int64)
    for i in range(n):
        target += weights[i // samples_per_step]
        j = int(np.argmax(target - counts))
        source[i], position[i] = j, counts[j]
        counts[j] += 1
    return source, position


class ScheduledBlend(torch.utils.data.Dataset):
    """Sources blended by `scheduled_blend_index`; items carry `dataset_id` like megatron's BlendedDataset."""

    def __init__(self, datasets: list, source: np.ndarray, position: np.ndarray):
        self.datasets, self.source, self.position = datasets, source, position

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        j = int(self.source[i])
        return {**self.datasets[j][int(self.position[i])], "dataset_id": j}


def build_scheduled_dataset(job, tokenizer) -> ScheduledBlend:
    """The CPT training set under `data.replay_schedule`: one unblended GPTDataset per source, sized to
    what the schedule draws from it, in the schedule's order."""
    d, t = job.data, job.train
    rs, steps = d.replay_schedule, job.steps
    labels = [s.label for s in d.train]
    r = labels.index(rs.source)
    others = np.array([s.weight for s in d.train], dtype=np.float64)
    others[r] = 0.0
    others /= others.sum()
    w = np.stack([others * (1 - rs.weight(step, steps)) for step in range(steps)])
    w[:, r] = [rs.weight(step, steps) for step in range(steps)]
    source, position = scheduled_blend_index(w, t.global_batch_size)
    datasets = [build_gpt_dataset([(s.path, 1.0)], max(int((source == j).sum()), 1), d.seq_length, tokenizer, t.seed + j,
                                  d.cache_dir) for j, s in enumerate(d.train)]
    return ScheduledBlend(datasets, source, position)


def to_device(batch: dict) -> dict:
    """Move a collated batch to the current CUDA device (no-op on CPU)."""
    if not torch.cuda.is_available():
        return batch
    return {k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


SEQ_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids")


def cp_slice(batch: dict, cp_size: int, cp_rank: int) -> dict:
    """This context-parallel rank's part of each sequence: the sequence is cut into 2*CP chunks and rank r
    keeps chunks r and 2*CP-1-r, so causal attention work is balanced (megatron-core's CP layout, which
    its TE attention and rotary embeddings expect)."""
    if cp_size == 1:
        return batch
    out = dict(batch)
    for k in SEQ_KEYS:
        if k in batch:
            v = batch[k]
            b, s = v.shape[:2]
            if s % (2 * cp_size):
                raise ValueError(f"sequence length {s} is not divisible by 2*CP = {2 * cp_size}")
            chunks = v.reshape(b, 2 * cp_size, s // (2 * cp_size), *v.shape[2:])
            out[k] = torch.cat([chunks[:, cp_rank], chunks[:, 2 * cp_size - 1 - cp_rank]], dim=1)
    return out


def on_this_rank(batch: dict) -> dict:
    """A collated batch on this rank's device, cut to its context-parallel share."""
    from megatron.core import parallel_state as ps

    return cp_slice(to_device(batch), ps.get_context_parallel_world_size(), ps.get_context_parallel_rank())


def collate(samples: list[dict], indices=None) -> dict:
    """Stack samples; `index` is each sample's global position in the training order (-1 for eval)."""
    keys = ("tokens", "labels", "loss_mask", "position_ids") + (("segment_ids",) if "segment_ids" in samples[0] else ())
    out = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in keys}
    out["tokens"], out["labels"], out["position_ids"] = out["tokens"].long(), out["labels"].long(), out["position_ids"].long()
    out["source"] = torch.tensor([int(s.get("dataset_id", 0)) for s in samples])
    out["index"] = torch.tensor(list(indices) if indices is not None else [-1] * len(samples), dtype=torch.long)
    return out


class ResumableBatches:
    """Micro-batches for this data-parallel rank, starting at global sample `consumed_samples`.

    Global sample order is 0, 1, 2, ...; each global batch of `global_batch` samples is split
    evenly over DP ranks, then into micro-batches.
    """

    def __init__(self, dataset, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0):
        self.ds, self.gb, self.mb, self.rank, self.dp = dataset, global_batch, micro_batch, dp_rank, dp_size
        self.consumed = consumed_samples
        self.per_rank = global_batch // dp_size

    def next_global_batch(self) -> list[dict]:
        """This rank's micro-batches for the next global batch."""
        start = self.consumed + self.rank * self.per_rank
        order = [start + i for i in range(self.per_rank)]
        self.consumed += self.gb
        # datasets with `global_index` (multi-epoch SFT) map a global sample index themselves
        wrap = (lambda i: i) if getattr(self.ds, "global_index", False) else (lambda i: i % len(self.ds))
        return [collate([self.ds[int(wrap(i))] for i in order[j:j + self.mb]], order[j:j + self.mb])
                for j in range(0, len(order), self.mb)]


def fixed_eval_batches(dataset, n_batches: int, micro_batch: int, dp_rank: int, dp_size: int) -> list[dict]:
    """The same held-out micro-batches at every evaluation."""
    n = len(dataset)
    per = n_batches * micro_batch
    idx = np.arange(dp_rank * per, (dp_rank + 1) * per) % n
    return [collate([dataset[int(i)] for i in idx[j:j + micro_batch]]) for j in range(0, per, micro_batch)]
