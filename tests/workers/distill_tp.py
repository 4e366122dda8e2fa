"""TP=2 vocab-parallel divergences vs the same computation at TP=1 (rank 0 computes both)."""
import json
import sys

import torch

from megatron_soaes.runtime import ParallelConfig, initialize


def main(out):
    initialize(ParallelConfig(tensor_parallel=2), seed=0)
    from megatron.core import parallel_state as ps

    from megatron_soaes.distill import losses

    rank = ps.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(0)
    V, vocab = 64, 60  # padded vocabulary: the last 4 entries carry no mass
    s_full = torch.randn(2, 5, V, generator=g) * 2
    t_full = torch.randn(2, 5, V, generator=g) * 2
    res = {}
    for kind in losses.DIVERGENCES:
        for top_k in (None, 7):
            s = s_full[..., rank * 32:(rank + 1) * 32].clone().requires_grad_(True)
            t = t_full[..., rank * 32:(rank + 1) * 32]
            d = losses.divergence(s, t, kind=kind, beta=0.3, temperature=1.5, vocab_size=vocab, top_k=top_k)
            d.sum().backward()
            grads = [torch.empty_like(s.grad) for _ in range(2)]
            torch.distributed.all_gather(grads, s.grad, group=ps.get_tensor_model_parallel_group())
            res[f"{kind}/{top_k}"] = {"value": d.tolist(), "grad": torch.cat(grads, -1).tolist()}
    one_minus_tvd, top1 = losses.agreement(s_full[..., rank * 32:(rank + 1) * 32], t_full[..., rank * 32:(rank + 1) * 32], vocab)
    res["agreement"] = {"value": one_minus_tvd.tolist(), "top1": top1.tolist()}
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main(sys.argv[1])
