"""Training a draft head in the one trainer: `kind: distill` with `distill.draft: eagle3` or `mtp`.

The teacher (the target, frozen, co-located as in distillation) runs each packed chat micro-batch once;
forward hooks keep the inputs of its feature layers (an MTP head: its final norm's output) and of layer 0
(the token embeddings). The head is then unrolled for `ttt_steps` steps (EAGLE-3's training-time test): step 0 reads the fused target
features, step j > 0 reads the head's own output of step j - 1, so it learns to draft from its own
drafts as it must at decoding time. Step j's loss is the divergence between the head's distribution over
the draft vocabulary and the target's (restricted to it and renormalised) one token further on,
weighted 0.8^j as EAGLE-3 does.

The steps run as one sequence of (j + 1) x s tokens with a mask: step j at index t sees step 0's keys
at indices <= t of its own example and, of every later step, only index t (its own ancestors in a
drafted chain) -- what the decoder's KV cache holds for a node at depth j.
"""

from __future__ import annotations

from functools import partial

import torch

from megatron_soaes.config import ConfigError
from megatron_soaes.data.gpt_data import on_this_rank
from megatron_soaes.distill.task import DistillTask
from megatron_soaes.heads.config import HeadConfig

STEP_DECAY = 0.8  # EAGLE-3's weight of step j: 0.8 ** j


def ttt_mask(steps: int, segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, n, n] bool (True: not allowed) over `steps` concatenated copies of the s positions."""
    b, s = segment_ids.shape
    dev = segment_ids.device
    blk = torch.arange(steps, device=dev).repeat_interleave(s)
    idx = torch.arange(s, device=dev).repeat(steps)
    qb, kb, qi, ki = blk[:, None], blk[None, :], idx[:, None], idx[None, :]
    seg = segment_ids.repeat(1, steps)
    same = seg[:, :, None] == seg[:, None, :]
    allowed = ((kb == 0) & (ki <= qi) & same) | ((kb >= 1) & (kb <= qb) & (ki == qi))
    return ~allowed[:, None]


def _shift(x: torch.Tensor, by: int, dim: int, fill=0) -> torch.Tensor:
    """x moved `by` places towards the start along `dim` (x[t + by] at t), `fill` past the end."""
    out = torch.full_like(x, fill)
    n = x.shape[dim]
    if by < n:
        out.narrow(dim, 0, n - by).copy_(x.narrow(dim, by, n - by))
    return out


class DraftHeadTask(DistillTask):
    packed_attention = "dense_mask"

    def prepare(self, job, tokenizer):
        d, p = job.distill, job.parallel
        what = f"distill.draft {d.draft}"
        if d.teacher is None:
            raise ConfigError(f"{what}: the head reads the target's hidden states; give distill.teacher "
                              "(online), not offline_logits")
        if job.sft is None:
            raise ConfigError(f"{what}: the head trains on chat data; give an sft section (e.g. the "
                              "target's own answers)")
        if p.sequence_parallel or p.pipeline_parallel != 1 or p.context_parallel != 1:
            raise ConfigError(f"{what}: the head trains at pipeline_parallel 1, context_parallel 1 and "
                              "without sequence_parallel (tensor_parallel and data parallel are fine)")
        if job.peft is not None:
            raise ConfigError(f"peft: an {d.draft} head trains all of its weights (it is small); remove the peft section")
        if job.model.init_checkpoint:
            raise ConfigError(f"model.init_checkpoint: with {what}, `model` names the target's architecture "
                              "and the head starts from random weights; the target's weights come from distill.teacher")
        k = d.head.draft_vocab
        if k is not None and k % p.tensor_parallel:
            raise ConfigError(f"distill.head.draft_vocab {k} must be divisible by parallel.tensor_parallel "
                              f"{p.tensor_parallel}")
        from megatron_soaes.models import resolve_model_config

        try:
            self.head_config(job, resolve_model_config(job.model, tokenizer))
        except ValueError as e:
            raise ConfigError(f"distill.head: {e}") from None
        if d.on_policy.fraction > 0:
            raise ConfigError(f"distill.on_policy: not with {what} (the head drafts from the target's "
                              "own tokens; train it on the target's answers instead)")
        return super().prepare(job, tokenizer)

    def head_config(self, job, model_cfg) -> HeadConfig:
        h = job.distill.head
        return HeadConfig(target=model_cfg.to_dict(), feature_layers=tuple(h.feature_layers or ()),
                          draft_vocab_size=min(h.draft_vocab or model_cfg.vocab_size, model_cfg.vocab_size),
                          ttt_steps=h.ttt_steps, kind=job.distill.draft)

    def build_model(self, job, model_cfg):
        """The head, its draft vocabulary (the training answers' most frequent tokens) in place, initialised
        (`distill.head.init`); a resumed run then loads its checkpoint over it."""
        from megatron_soaes.data.tokenizer import load_tokenizer
        from megatron_soaes.heads.megatron import build_head, init_from_target
        from megatron_soaes.heads.vocab import coverage, draft_vocabulary
        from megatron_soaes.sft.task import train_rows

        self.hcfg = self.head_config(job, model_cfg)
        rows, _ = train_rows(job, load_tokenizer(job.data.tokenizer), progress=False)
        self.vocab = model_cfg.vocab_size
        self.ids = draft_vocabulary(rows["labels"], rows["loss_mask"], self.hcfg.draft_vocab_size, self.vocab)
        self.coverage = coverage(self.ids, rows["labels"], rows["loss_mask"])
        head = build_head(self.hcfg, job.train.dtype)
        head.draft_ids.copy_(self.ids.to(head.draft_ids.device))
        if job.distill.head.init == "target":
            init_from_target(head, job.distill.teacher.checkpoint)
        return head

    def checkpoint_meta(self) -> dict:
        return {"draft_head": self.hcfg.to_dict()}

    def build(self, job, tokenizer, model_cfg, dp_rank, dp_size, consumed_samples):
        batches, evals = super().build(job, tokenizer, model_cfg, dp_rank, dp_size, consumed_samples)
        self.packed_attention = "dense_mask"  # the teacher's mask; the head builds its own
        self.dataset = batches.ds
        self.cache = TeacherCache(len(self.dataset)) if job.distill.head.cache_teacher else None
        self.steps = job.distill.head.ttt_steps
        self.report_keys = ("lm loss", "kd loss", *(f"agree@{j}" for j in range(self.steps)))
        self._features: dict[int, torch.Tensor] = {}
        decoder = self.teacher.model.decoder
        for i in {0, *self.hcfg.feature_layers}:
            if i < len(decoder.layers):
                decoder.layers[i].register_forward_pre_hook(partial(self._keep, i), with_kwargs=True)
            else:  # past the last layer: its output after the final norm
                decoder.final_layernorm.register_forward_hook(partial(self._keep_output, i))
        return batches, evals

    def _keep(self, i, module, args, kwargs):
        self._features[i] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach()

    def _keep_output(self, i, module, args, output):
        self._features[i] = output.detach()

    def on_built(self, model, optimizer):
        super().on_built(model, optimizer)
        if torch.distributed.get_rank() == 0:
            reads = ("the target's final hidden state" if self.hcfg.kind == "mtp" else
                     f"features from target layers {list(self.hcfg.feature_layers)}")
            print(f"{self.hcfg.kind} draft head: {self.hcfg.draft_vocab_size} of {self.vocab} tokens in the draft "
                  f"vocabulary ({self.coverage:.1%} of the training answers' tokens); {reads}; {self.steps} "
                  "training-time-test steps", flush=True)

    def forward_step(self, data_iterator, model):
        b = on_this_rank(next(data_iterator))
        seg = b.get("segment_ids")
        if seg is None:
            seg = torch.ones_like(b["tokens"])
        feats, emb, mine, best = self.teacher_outputs(b)
        head = model.module
        # step j at index t predicts the token the target predicts at position t + 1 + j: scored only where that
        # is an answer token of the same example (the output layer runs on those positions alone)
        lm = b["loss_mask"].float()
        valid = [(_shift(lm, 1 + j, 1) * (_shift(seg, 1 + j, 1, fill=-1) == seg).float()).bool()
                 for j in range(self.steps)]
        hidden = self.unroll(head, feats, emb, seg)
        out = torch.cat([head.logits(h.transpose(0, 1)[v]) for h, v in zip(hidden, valid)])  # [sum of valid, K / tp]
        return out, partial(self._loss, mine, best, valid)

    def teacher_outputs(self, b):
        """(features [s, b, 3d], embeddings [s, b, d], the target's logits over this rank's share of the draft
        vocabulary [b, s, K / tp], its argmax over the whole vocabulary [b, s]) -- from the cache when every
        row of the micro-batch has been through the teacher before (cache_teacher; training rows only)."""
        rows = [self.dataset.row(int(i)) for i in b["index"]] if self.cache is not None and int(b["index"][0]) >= 0 else None
        if rows is not None and self.cache.has(rows):
            return self.cache.get(rows, b["tokens"].device)
        out = self._run_teacher(b)
        if rows is not None:
            self.cache.put(rows, *out)
        return out

    @torch.no_grad()
    def _run_teacher(self, b):
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        from megatron_soaes.sft.task import packed_mask

        seg = b.get("segment_ids")
        mask = packed_mask(seg, self.packed_attention) if seg is not None else None
        self._features.clear()
        teacher = self.teacher.logits(b["tokens"], b["position_ids"], mask)  # [b, s, V / tp]
        feats = torch.cat([self._features[i] for i in self.hcfg.feature_layers], -1)  # [s, b, 3d]
        full = gather_from_tensor_model_parallel_region(teacher)[..., :self.vocab].float()  # [b, s, V]
        on_draft = full[..., self.ids.to(full.device)]  # the target's logits over the draft vocabulary
        k = on_draft.shape[-1] // ps.get_tensor_model_parallel_world_size()
        r = ps.get_tensor_model_parallel_rank()
        return feats, self._features[0], on_draft[..., r * k:(r + 1) * k].contiguous(), full.argmax(-1)

    def unroll(self, head, feats, emb, seg) -> list[torch.Tensor]:
        """The head's output hidden state [s, b, d] at each training-time-test step."""
        s = emb.shape[0]
        hidden, embs, pos = [head.fuse(feats)], [], []
        for j in range(self.steps):
            embs.append(_shift(emb, 1 + j, 0))  # step j at index t reads token t + 1 + j
            pos.append(torch.arange(s, device=emb.device) + j)
            hidden.append(head.step(torch.cat(embs), torch.cat(hidden), torch.cat(pos), ttt_mask(j + 1, seg))[j * s:])
        return hidden[1:]

    def _loss(self, mine, best, valid, output):
        from megatron_soaes.distill.losses import divergence
        from megatron_soaes.models.vocab_parallel import vp_argmax

        d = self.d
        ids = self.ids.to(output.device)
        total, report, at = 0.0, {}, 0
        for j, v in enumerate(valid):
            n_j = int(v.sum())
            logits = output[at:at + n_j]
            at += n_j
            kd = divergence(logits, teacher_logits=_shift(mine, 1 + j, 1)[v], kind=d.divergence, beta=d.beta,
                            temperature=d.temperature, vocab_size=self.hcfg.draft_vocab_size, top_k=d.top_k)
            hit = (ids[vp_argmax(logits.detach())] == _shift(best, 1 + j, 1)[v]).float()
            part = kd.sum()
            total = total + STEP_DECAY ** j * part
            count = v.sum().float()
            if j == 0:
                n = count
                report["kd loss"] = torch.stack([part.detach(), n])
            report[f"agree@{j}"] = torch.stack([hit.sum(), count])
        report["lm loss"] = torch.stack([total.detach(), n])
        return total, n.to(torch.int), report


class TeacherCache:
    """The teacher's outputs per training row (cache_teacher), in bf16 host buffers allocated once at the first
    row: features [rows, s, F], embeddings [rows, s, d], logits over this rank's draft vocabulary [rows, s, K / tp],
    and the target's argmax [rows, s]. One allocation, not one per row: small long-lived blocks left among each
    step's large freed ones fragment the heap (CPU runs keep freed memory, `runtime.cpu_compat`), by about ten
    times what the cached rows hold."""

    def __init__(self, rows: int):
        self.rows, self.buffers, self.filled = rows, None, torch.zeros(rows, dtype=torch.bool)

    def has(self, rows: list[int]) -> bool:
        return bool(self.filled[rows].all())

    def put(self, rows: list[int], feats, emb, mine, best) -> None:
        """feats [s, b, F] and emb [s, b, d] (the teacher's layout), mine [b, s, K / tp], best [b, s]."""
        parts = (feats.transpose(0, 1), emb.transpose(0, 1), mine, best)
        if self.buffers is None:
            self.buffers = [torch.empty((self.rows, *x.shape[1:]), dtype=torch.int32 if i == 3 else torch.bfloat16)
                            for i, x in enumerate(parts)]
        idx = torch.tensor(rows)
        for buf, x in zip(self.buffers, parts):
            buf[idx] = x.detach().to("cpu", buf.dtype)
        self.filled[idx] = True

    def get(self, rows: list[int], device) -> tuple:
        idx = torch.tensor(rows)
        feats, emb, mine, best = (buf[idx].to(device) for buf in self.buffers)
        return (feats.float().transpose(0, 1).contiguous(), emb.float().transpose(0, 1).contiguous(), mine.float(),
                best.long())
