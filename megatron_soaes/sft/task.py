"""SFT task for the trainer: packed chat rows, answer-only loss, no cross-example attention;
`prepare` turns sft.epochs into train.steps for every entry point."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch

from megatron_soaes.config import ConfigError
from megatron_soaes.data.gpt_data import ResumableBatches, collate, on_this_rank
from megatron_soaes.data.sft import PackedSFTDataset, Template, cached_pack
from megatron_soaes.training.task import BaseTask, masked_token_loss


def _cache_dir(job) -> Path:
    return Path(job.data.cache_dir or Path(job.train.output_dir) / "data_cache")


def packed_rows(job, tokenizer, files, replay=None, progress=True):
    s = job.sft
    return cached_pack([(f.path, f.repeat) for f in files], tokenizer, job.data.seq_length,
                       Template(s.default_system, s.last_turn_only), _cache_dir(job), s.truncation, s.packing,
                       replay=replay, progress=progress)


def train_rows(job, tokenizer, progress=True):
    s = job.sft
    replay = ([(f.path, f.repeat) for f in s.replay], s.replay_fraction, job.train.seed) if s.replay else None
    return packed_rows(job, tokenizer, s.train, replay, progress)


def with_steps_from_epochs(job, tokenizer):
    """`job` with train.steps = ceil(sft.epochs * packed rows / global batch) (packing is cached), and
    warm-up shortened to a tenth of that when it would not fit. A job with train.steps is unchanged."""
    if job.sft is None or job.sft.epochs is None:
        return job
    from megatron_soaes.config import replace
    from megatron_soaes.runtime import world_info

    _, stats = train_rows(job, tokenizer, progress=world_info()[0] == 0)
    steps = max(1, math.ceil(job.sft.epochs * stats["rows"] / job.train.global_batch_size))
    optim = job.optim if job.optim.warmup_steps < steps else replace(job.optim, warmup_steps=steps // 10)
    return replace(job, train=replace(job.train, steps=steps), optim=optim, sft=replace(job.sft, epochs=None))


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] boolean, True where attention is NOT allowed (megatron's convention)."""
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return ~(same & causal)[:, None]


def packed_mask(segment_ids: torch.Tensor, kind: str = "dense_mask"):
    """The attention_mask that keeps packed examples apart: a FlexAttention document mask, or dense. Under
    context parallelism always the segment ids (`DocumentMask`): a rank's chunks attend across chunks, which
    only the attention itself can mask (`models.context_parallel`)."""
    from megatron_soaes.models.context_parallel import cp_group_and_rank

    if kind == "flex" or cp_group_and_rank()[1] > 1:
        from megatron_soaes.models.attention import DocumentMask

        return DocumentMask(segment_ids)
    return block_causal_mask(segment_ids)


def packed_seq_params(segment_ids: torch.Tensor):
    """THD / cu_seqlens for Transformer Engine's fused attention (micro-batch size 1)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    if segment_ids.shape[0] != 1:
        raise ValueError("THD packing with Transformer Engine needs micro_batch_size 1")
    seg = segment_ids[0]
    change = torch.nonzero(seg[1:] != seg[:-1]).flatten() + 1
    cu = torch.cat([torch.zeros(1, dtype=torch.long, device=seg.device), change,
                    torch.tensor([seg.numel()], device=seg.device)]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def select_packed_attention(job) -> str:
    """`sft.packed_attention` resolved for this machine; a choice that cannot run is a ConfigError
    naming the field, before any work."""
    from megatron_soaes.models.attention import have_flex_attention
    from megatron_soaes.models.megatron import select_attention, use_transformer_engine

    use_te = use_transformer_engine(job)
    attention, want = select_attention(job, use_te), job.sft.packed_attention
    cuda = torch.cuda.is_available()
    if want == "auto":
        want = ("thd" if use_te and cuda and job.train.micro_batch_size == 1
                else "flex" if cuda and attention == "sdpa" and have_flex_attention() else "dense_mask")
    if want == "thd" and not (use_te and cuda):
        raise ConfigError("sft.packed_attention: thd needs Transformer Engine layers on a GPU; "
                          "use flex (SDPA layers) or dense_mask")
    if want == "thd" and job.train.micro_batch_size != 1:
        raise ConfigError(f"sft.packed_attention: thd needs train.micro_batch_size 1, got {job.train.micro_batch_size}")
    if want == "flex" and attention != "sdpa":
        raise ConfigError(f"sft.packed_attention: flex runs in the SDPA core attention, not {attention} "
                          "(set train.attention: sdpa)")
    if want == "flex" and not cuda:
        raise ConfigError("sft.packed_attention: flex trains on a GPU only (FlexAttention has no backward on CPU); "
                          "use dense_mask")
    if want == "flex" and not have_flex_attention():
        raise ConfigError(f"sft.packed_attention: flex needs torch.nn.attention.flex_attention (torch >= 2.5), "
                          f"this torch is {torch.__version__}")
    return want


class SFTTask(BaseTask):
    def __init__(self, packed_attention: str | None = None):
        self.packed_attention = packed_attention

    def prepare(self, job, tokenizer):
        """Steps from epochs, and the packed-attention path resolved (so the run's config dump names it)."""
        from megatron_soaes.config import replace

        job = with_steps_from_epochs(job, tokenizer)
        if job.sft is not None and job.sft.packed_attention == "auto" and self.packed_attention is None:
            try:
                job = replace(job, sft=replace(job.sft, packed_attention=select_packed_attention(job)))
            except ConfigError:  # a dry run on a machine unlike the job's (a login node): decided where it runs
                pass
        return job

    def build(self, job, tokenizer, model_cfg, dp_rank, dp_size, consumed_samples):
        self.packed_attention = self.packed_attention or select_packed_attention(job)
        t = job.train
        rows, self.stats = train_rows(job, tokenizer, progress=torch.distributed.get_rank() == 0)
        batches = ResumableBatches(PackedSFTDataset(rows, t.seed), t.global_batch_size, t.micro_batch_size,
                                   dp_rank, dp_size, consumed_samples)
        evals = {}
        for name, files in job.sft.valid.items():
            vrows, vstats = packed_rows(job, tokenizer, files, progress=False)
            ds = PackedSFTDataset(vrows, t.seed, shuffle=False)
            if len(ds) == 0:
                raise ConfigError(f"sft.valid[{name!r}] ({', '.join(f.path for f in files)}): no example fits "
                                  f"data.seq_length {job.data.seq_length} ({ {k: v for k, v in vstats.items() if k != 'rows'} })")
            per = t.eval_iters * t.micro_batch_size
            idx = [(dp_rank * per + i) % len(ds) for i in range(per)]
            evals[name] = [collate([ds[i] for i in idx[j:j + t.micro_batch_size]]) for j in range(0, per, t.micro_batch_size)]
        return batches, evals

    def forward_step(self, data_iterator, model):
        b = on_this_rank(next(data_iterator))
        if self.packed_attention == "thd":
            out = model(b["tokens"], b["position_ids"], None, labels=b["labels"],
                        packed_seq_params=packed_seq_params(b["segment_ids"]))
        else:
            out = model(b["tokens"], b["position_ids"], packed_mask(b["segment_ids"], self.packed_attention),
                        labels=b["labels"])
        return out, partial(masked_token_loss, b["loss_mask"])
