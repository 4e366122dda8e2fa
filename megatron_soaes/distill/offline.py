"""Offline teacher logits: run the teacher once over the training sample order, store its top-k.

Layout of the output directory:
  topk.json            k, value dtype, samples per shard, number of samples, and the data fingerprint
                       (sources, weights, seed, sequence length) training checks against
  shard_000123.pt      {"values": [n, seq, k] (bf16 by default), "indices": [n, seq, k] int32}
Shards are written to a temporary name and renamed, so an interrupted dump resumes by skipping
the shards that exist. Sample i of the training order lives in shard i // samples_per_shard.
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from pathlib import Path

import torch

from megatron_soaes.config import ConfigError
from megatron_soaes.utils.dtypes import DTYPES



def fingerprint(job) -> dict:
    d = job.data
    return {"train": [[s.path, s.weight] for s in d.train], "seed": job.train.seed, "seq_length": d.seq_length,
            "tokenizer": d.tokenizer}


class TopKStore:
    """Read stored top-k teacher logits by global sample index (a few shards cached)."""

    def __init__(self, directory, job, needed_samples: int, top_k: int, cache_shards: int = 4):
        self.dir = Path(directory)
        meta = json.loads((self.dir / "topk.json").read_text())
        if meta["fingerprint"] != fingerprint(job):
            raise ConfigError(f"distill.offline_logits: {self.dir} was dumped for other data "
                              f"({meta['fingerprint']}), not {fingerprint(job)}")
        if top_k > meta["k"]:
            raise ConfigError(f"distill.top_k {top_k} > the stored k {meta['k']} in {self.dir}")
        if meta["num_samples"] < needed_samples:
            raise ConfigError(f"distill.offline_logits: {self.dir} holds {meta['num_samples']} samples, "
                              f"training needs {needed_samples}")
        missing = [i for i in range(-(-needed_samples // meta["samples_per_shard"]))
                   if not (self.dir / f"shard_{i:06d}.pt").exists()]
        if missing:
            raise ConfigError(f"distill.offline_logits: {self.dir} is incomplete (shard {missing[0]} missing; "
                              "rerun soaes distill-dump to finish it)")
        self.meta, self.k = meta, top_k
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._cap = cache_shards

    def _shard(self, i: int) -> dict:
        if i not in self._cache:
            self._cache[i] = torch.load(self.dir / f"shard_{i:06d}.pt", weights_only=True)
            if len(self._cache) > self._cap:
                self._cache.popitem(last=False)
        self._cache.move_to_end(i)
        return self._cache[i]

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.meta["samples_per_shard"]
        vals, idx = [], []
        for i in indices.tolist():
            sh = self._shard(i // n)
            vals.append(sh["values"][i % n, :, :self.k].float())
            idx.append(sh["indices"][i % n, :, :self.k].long())
        return torch.stack(vals), torch.stack(idx)


def dump_topk(job, out_dir, top_k: int, value_dtype: str = "bf16", samples_per_shard: int = 64,
              num_samples: int | None = None, log=print) -> Path:
    """Run the job's teacher over the job's training samples (all of them by default). Collective."""
    from megatron.core import parallel_state as ps

    from megatron_soaes.data.gpt_data import build_gpt_dataset, collate, to_device
    from megatron_soaes.data.tokenizer import load_tokenizer
    from megatron_soaes.distill.losses import teacher_topk
    from megatron_soaes.distill.teacher import Teacher
    from megatron_soaes.config import ParallelConfig
    from megatron_soaes.models import resolve_model_config
    from megatron_soaes.runtime import initialize

    if job.distill is None or job.distill.teacher is None:
        raise ConfigError("distill.teacher: the dump needs an online teacher in the config")
    if value_dtype not in DTYPES:
        raise ConfigError(f"value dtype must be one of {list(DTYPES)}")
    tokenizer = load_tokenizer(job.data.tokenizer)
    p = job.parallel
    initialize(ParallelConfig(tensor_parallel=p.tensor_parallel), seed=job.train.seed)
    student_cfg = resolve_model_config(job.model, tokenizer)
    teacher = Teacher(job, tokenizer, student_cfg)
    t, d = job.train, job.data
    total = num_samples or job.steps * t.global_batch_size
    ds = build_gpt_dataset([(s.path, s.weight) for s in d.train], job.steps * t.global_batch_size, d.seq_length,
                           tokenizer, t.seed, d.cache_dir)
    out = Path(out_dir)
    rank = torch.distributed.get_rank()
    meta = {"k": top_k, "value_dtype": value_dtype, "samples_per_shard": samples_per_shard, "num_samples": total,
            "fingerprint": fingerprint(job), "teacher": job.distill.teacher.checkpoint}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        old = out / "topk.json"
        if old.exists():
            prev = json.loads(old.read_text())
            if {k: prev.get(k) for k in meta} != meta:
                raise ConfigError(f"{out}: holds a dump with other settings; use a new directory")
        tmp = out / "topk.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, old)
    torch.distributed.barrier()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    n_shards = -(-total // samples_per_shard)
    mine = [i for i in range(n_shards) if i % dp == dp_rank and not (out / f"shard_{i:06d}.pt").exists()]
    t0, done = time.time(), 0
    for j, shard in enumerate(mine):
        lo, hi = shard * samples_per_shard, min(total, (shard + 1) * samples_per_shard)
        vals, idxs = [], []
        for a in range(lo, hi, t.micro_batch_size):
            b = to_device(collate([ds[i % len(ds)] for i in range(a, min(hi, a + t.micro_batch_size))]))
            v, i = teacher_topk(teacher.logits(b["tokens"], b["position_ids"]), top_k, student_cfg.vocab_size)
            vals.append(v.to(DTYPES[value_dtype]).cpu())
            idxs.append(i.to(torch.int32).cpu())
        if ps.get_tensor_model_parallel_rank() == 0:
            path = out / f"shard_{shard:06d}.pt"
            torch.save({"values": torch.cat(vals), "indices": torch.cat(idxs)}, str(path) + ".tmp")
            os.replace(str(path) + ".tmp", path)
        done += hi - lo
        rate = done / max(time.time() - t0, 1e-9)
        if rank == 0:
            log(f"distill-dump: shard {j + 1}/{len(mine)} (this rank) | {rate:.1f} samples/s | "
                f"ETA {(len(mine) - j - 1) * samples_per_shard / max(rate, 1e-9):.0f}s")
    torch.distributed.barrier()
    return out
