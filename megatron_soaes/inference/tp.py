"""Tensor parallelism for the inference model, gpt-fast `tp.py` style, in one page.

Column-parallel: q/k/v (heads and their biases) and gate/up (intermediate rows); row-parallel: o_proj and
down (their input columns), each followed by one all-reduce; the embedding is replicated; the LM head
is split over the vocabulary and its logits gathered, so every rank holds the full logits and makes
the same decisions (sampling with the same seeded generator, tree verification, cache compaction):
the decode loops need no change. The KV cache holds the local heads only. A small draft runs
replicated on every rank, so drafting costs no communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class TensorParallelError(ValueError):
    """A TP size that cannot split this model; raised before any weight is read."""


@dataclass(frozen=True)
class TensorParallel:
    size: int = 1
    rank: int = 0
    group: object = None  # torch.distributed process group (None: the default group)

    @classmethod
    def from_env(cls) -> "TensorParallel":
        """The whole (torchrun / srun) world as one TP group; a single process is TP 1."""
        import torch.distributed as dist

        return cls(dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else cls()

    def check(self, cfg) -> None:
        for n, what in ((cfg.num_attention_heads, "num_attention_heads"), (cfg.num_key_value_heads, "num_key_value_heads"),
                        (cfg.intermediate_size, "intermediate_size"),
                        *([(cfg.moe_intermediate_size, "moe_intermediate_size")] if cfg.is_moe else [])):
            if n % self.size:
                raise TensorParallelError(f"tensor parallel {self.size} does not divide {what} {n}")

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's slice of dim 0 (output features: heads, intermediate units)."""
        return t if self.size == 1 else t.chunk(self.size, 0)[self.rank]

    def cols(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.size == 1 else t.chunk(self.size, -1)[self.rank]

    def vocab_rows(self, t: torch.Tensor) -> torch.Tensor:
        """LM-head rows of this rank, zero-padded so every rank has ceil(V / size)."""
        if self.size == 1:
            return t
        per = -(-t.shape[0] // self.size)
        t = torch.nn.functional.pad(t, (0, 0, 0, per * self.size - t.shape[0]))
        return t[self.rank * per:(self.rank + 1) * per]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab: int) -> torch.Tensor:
        if self.size == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.size)]
        torch.distributed.all_gather(parts, logits.contiguous(), group=self.group)
        return torch.cat(parts, -1)[..., :vocab]
