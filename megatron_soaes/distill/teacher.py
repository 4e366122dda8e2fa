"""The frozen teacher: a megatron GPTModel beside the student, no grads, no optimizer state."""

from __future__ import annotations

import torch

from megatron_soaes.config import ConfigError


def teacher_config(section, tokenizer):
    from megatron_soaes.models import resolve_model_config

    return resolve_model_config(section, tokenizer, "distill.teacher")


def check_pair(job, student_cfg, teacher_cfg) -> None:
    """What co-located distillation supports; everything else fails here, before any work."""
    t = job.distill.teacher
    if t.tensor_parallel not in (None, job.parallel.tensor_parallel):
        raise ConfigError(
            f"distill.teacher.tensor_parallel {t.tensor_parallel} != parallel.tensor_parallel "
            f"{job.parallel.tensor_parallel}: a co-located teacher runs at the student's TP size "
            f"(dump its top-k logits at any TP with `soaes distill-dump` and train offline instead)")
    if job.parallel.pipeline_parallel != 1:
        raise ConfigError("parallel.pipeline_parallel: distillation runs the teacher inside the student's "
                          "forward step and needs pipeline_parallel 1")
    if teacher_cfg.padded_vocab_size != student_cfg.padded_vocab_size:
        raise ConfigError(f"distill.teacher: padded vocabulary {teacher_cfg.padded_vocab_size} differs from the "
                          f"student's {student_cfg.padded_vocab_size}; the models must share a tokenizer")
    teacher_cfg.check_parallel(job.parallel.tensor_parallel, 1)


class Teacher:
    def __init__(self, job, tokenizer, student_cfg):
        from megatron_soaes.checkpoint.load import load_model_weights
        from megatron_soaes.models import build_model

        section = job.distill.teacher
        self.cfg = teacher_config(section, tokenizer)
        check_pair(job, student_cfg, self.cfg)
        dtype = section.dtype or job.train.dtype
        from megatron_soaes.models.megatron import select_attention, use_transformer_engine

        use_te = use_transformer_engine(job)
        self.model = build_model(self.cfg, dtype=dtype, use_te=use_te, attention=select_attention(job, use_te),
                                 sequence_parallel=job.parallel.sequence_parallel)
        load_model_weights(self.model, section.checkpoint)
        self.model.eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """Vocab-sharded logits [b, s, V/tp], like the student's."""
        return self.model(tokens, position_ids, attention_mask)
