"""Distillation task for the trainer: teacher (online or stored top-k) + divergence + CE.

Data is either the CPT data (blended GPT samples) or, with an `sft` section, packed chat data
(answer tokens only, no cross-example attention) -- the text the draft will have to predict at
serving time. On-policy micro-batches replace each sample's continuation after `prompt_tokens`
with the student's own generation (DistillSpec); the loss is then taken on the generated part.
"""

from __future__ import annotations

import zlib
from functools import partial

import torch

from megatron_soaes.data.gpt_data import on_this_rank
from megatron_soaes.distill.losses import agreement, divergence
from megatron_soaes.config import ConfigError
from megatron_soaes.training.cpt import CPTTask
from megatron_soaes.training.task import masked_token_loss


class DistillTask(CPTTask):
    report_keys = ("lm loss", "kd loss", "ce loss")
    packed_attention = "dense_mask"  # SFT-data distillation: set in build
    eval_forward_step = None  # held-out sets are scored as in training (KD and CE), not as CPT's plain text

    def prepare(self, job, tokenizer):
        """The student (the future draft) must be the teacher's (the target's) family: checked here,
        before any model is built."""
        from megatron_soaes.models import resolve_model_config
        from megatron_soaes.models.config import ModelConfigError, check_same_family
        from megatron_soaes.sft.task import with_steps_from_epochs

        if job.distill.teacher is not None:
            from megatron_soaes.distill.teacher import teacher_config

            try:
                check_same_family(teacher_config(job.distill.teacher, tokenizer),
                                  resolve_model_config(job.model, tokenizer), "model (the student)")
            except ModelConfigError as e:
                raise ConfigError(f"distill.teacher: {e}") from None
        return with_steps_from_epochs(job, tokenizer)

    def build(self, job, tokenizer, model_cfg, dp_rank, dp_size, consumed_samples):
        d = job.distill
        if job.parallel.pipeline_parallel != 1:
            raise ConfigError("parallel.pipeline_parallel: distillation needs pipeline_parallel 1")
        self.d, self.vocab, self.seed = d, model_cfg.vocab_size, job.train.seed
        self.teacher, self.store = None, None
        if d.teacher is not None:
            from megatron_soaes.distill.teacher import Teacher

            self.teacher = Teacher(job, tokenizer, model_cfg)
            self.report_keys = ("lm loss", "kd loss", "ce loss", "1-tvd", "top1 agree")
        else:
            from megatron_soaes.distill.offline import TopKStore

            self.store = TopKStore(d.offline_logits, job, job.steps * job.train.global_batch_size, d.top_k)
            self.report_keys = ("lm loss", "kd loss", "ce loss")
        if job.sft is not None:
            from megatron_soaes.sft.task import SFTTask, select_packed_attention

            # the teacher and the student see the same mask object: no THD (the teacher runs unpacked)
            self.packed_attention = "flex" if select_packed_attention(job) == "flex" else "dense_mask"
            return SFTTask(self.packed_attention).build(job, tokenizer, model_cfg, dp_rank, dp_size, consumed_samples)
        return super().build(job, tokenizer, model_cfg, dp_rank, dp_size, consumed_samples)

    def on_built(self, model, optimizer):
        self.student, self.optimizer = model, optimizer

    # ---- on-policy rollouts ----
    def _on_policy(self, index: torch.Tensor) -> bool:
        f = self.d.on_policy.fraction
        if f <= 0 or int(index[0]) < 0:
            return False
        return zlib.crc32(f"{self.seed}:{int(index[0])}".encode()) % 10_000 < f * 10_000

    @torch.no_grad()
    def _rollout(self, model, b: dict) -> dict:
        """Keep the first `prompt_tokens`, let the student write the rest (sampled, seeded by sample index)."""
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        op = self.d.on_policy
        tokens = b["tokens"].clone()
        P = min(op.prompt_tokens, tokens.shape[1] - 1)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(b["index"][0]))
        was_training = model.training
        model.eval()
        for pos in range(P, tokens.shape[1]):
            logits = gather_from_tensor_model_parallel_region(model(tokens[:, :pos], b["position_ids"][:, :pos], None))
            logits = logits[:, -1, :self.vocab].float()
            if op.temperature > 0:
                probs = torch.softmax(logits / op.temperature, -1).cpu()  # the seeded generator lives on the CPU
                nxt = torch.multinomial(probs, 1, generator=g)[:, 0].to(tokens.device)
            else:
                nxt = logits.argmax(-1)
            tokens[:, pos] = nxt
        model.train(was_training)
        labels = torch.cat([tokens[:, 1:], b["labels"][:, -1:]], 1)
        mask = torch.zeros_like(b["loss_mask"])
        mask[:, P - 1:-1] = 1  # predictions of generated tokens
        return {**b, "tokens": tokens, "labels": labels, "loss_mask": mask}

    def forward_step(self, data_iterator, model):
        b = on_this_rank(next(data_iterator))
        if self.teacher is not None and "segment_ids" not in b and self._on_policy(b["index"]):
            b = self._rollout(model, b)
        mask = None
        if "segment_ids" in b:
            from megatron_soaes.sft.task import packed_mask

            mask = packed_mask(b["segment_ids"], self.packed_attention)
        teacher = {}
        if self.teacher is not None:
            teacher["teacher_logits"] = self.teacher.logits(b["tokens"], b["position_ids"], mask)
        elif int(b["index"][0]) >= 0:
            v, i = self.store.get(b["index"].cpu())
            teacher["teacher_topk_values"], teacher["teacher_topk_indices"] = v.to(b["tokens"].device), i.to(b["tokens"].device)
        out = model(b["tokens"], b["position_ids"], mask)
        return out, partial(self._loss, b, teacher)

    def _loss(self, b, teacher, output):
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        d = self.d
        # megatron's vocab-parallel CE works in place on its input (logits -> softmax): give it a copy
        ce = vocab_parallel_cross_entropy(output.float() if output.dtype != torch.float32 else output.clone(),
                                          b["labels"])
        if teacher:
            kd = divergence(output, kind=d.divergence, beta=d.beta, temperature=d.temperature, vocab_size=self.vocab,
                            top_k=d.top_k, **teacher)
            per_token = d.kd_weight * kd + (1 - d.kd_weight) * ce
        else:  # held-out batches in offline mode: no stored teacher logits, report CE
            kd, per_token = None, ce
        total, n, report = masked_token_loss(b["loss_mask"], per_token)
        mask = b["loss_mask"].reshape(-1).float()

        def part(x):
            return torch.stack([(x.detach().reshape(-1).float() * mask).sum(), mask.sum()])

        report["ce loss"] = part(ce)
        if kd is not None:
            report["kd loss"] = part(kd)
        if "teacher_logits" in teacher:
            one_minus_tvd, top1 = agreement(output, teacher["teacher_logits"], self.vocab)
            report["1-tvd"], report["top1 agree"] = part(one_minus_tvd), part(top1)
        return total, n, report
