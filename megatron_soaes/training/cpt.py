"""Continual pre-training task: blended domain + replay GPT data, next-token loss."""

from __future__ import annotations

from functools import partial

from megatron_soaes.data.gpt_data import (ResumableBatches, build_gpt_dataset, build_scheduled_dataset, fixed_eval_batches,
                                          on_this_rank)
from megatron_soaes.training.task import BaseTask, masked_token_loss


class CPTTask(BaseTask):
    def build(self, job, tokenizer, model_cfg, dp_rank, dp_size, consumed_samples):
        t, d = job.train, job.data
        self.vocab = model_cfg.vocab_size
        if d.replay_schedule:  # the replay weight moves over the steps
            train = build_scheduled_dataset(job, tokenizer)
        else:
            train = build_gpt_dataset([(s.path, s.weight) for s in d.train], job.steps * t.global_batch_size,
                                      d.seq_length, tokenizer, t.seed, d.cache_dir)
        batches = ResumableBatches(train, t.global_batch_size, t.micro_batch_size, dp_rank, dp_size, consumed_samples)
        return batches, {name: text_eval_batches(job, sources, tokenizer, dp_rank, dp_size) for name, sources in d.valid.items()}

    def forward_step(self, data_iterator, model):
        return lm_forward_step(data_iterator, model)

    def eval_forward_step(self, data_iterator, model):
        return lm_eval_forward_step(data_iterator, model, self.vocab)


def text_eval_batches(job, sources, tokenizer, dp_rank: int, dp_size: int) -> list[dict]:
    """A held-out indexed text set as this rank's fixed eval micro-batches (the same every evaluation)."""
    t, d = job.train, job.data
    n = t.eval_iters * t.micro_batch_size * dp_size
    ds = build_gpt_dataset([(s.path, s.weight) for s in sources], n, d.seq_length, tokenizer, t.seed, d.cache_dir)
    return fixed_eval_batches(ds, t.eval_iters, t.micro_batch_size, dp_rank, dp_size)


def lm_forward_step(data_iterator, model):
    """Next-token loss on plain text (CPT's step; any task's general-text evaluation)."""
    b = on_this_rank(next(data_iterator))
    out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
    return out, partial(masked_token_loss, b["loss_mask"])


def lm_eval_forward_step(data_iterator, model, vocab_size: int | None = None):
    """Held-out plain text: next-token loss and top-1 accuracy (the argmax over the real vocabulary,
    vocab-parallel), reported as "lm loss" and "accuracy"."""
    b = on_this_rank(next(data_iterator))
    logits = model(b["tokens"], b["position_ids"], None)
    return logits, partial(_loss_and_accuracy, b, vocab_size)


def _loss_and_accuracy(b, vocab_size, logits):
    import torch
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_soaes.models.vocab_parallel import mask_padding, vp_argmax

    # megatron's vocab-parallel CE works in place on its input: give it a copy
    ce = vocab_parallel_cross_entropy(logits.float() if logits.dtype != torch.float32 else logits.clone(), b["labels"])
    total, n, report = masked_token_loss(b["loss_mask"], ce)
    mask = b["loss_mask"].reshape(-1).float()
    hit = (vp_argmax(mask_padding(logits.detach(), vocab_size)) == b["labels"]).reshape(-1).float()
    report["accuracy"] = torch.stack([(hit * mask).sum(), mask.sum()])
    return total, n, report
