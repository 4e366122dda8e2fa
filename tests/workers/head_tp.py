"""A draft head (EAGLE-3 or MTP) on megatron at this world size's TP (its checkpoint resharded on load): every
training-time-test step's logits, gathered over the draft vocabulary, and the gradients of its feature
projection (EAGLE-3's fc, MTP's eh_proj) and QKV under a fixed random loss; and the projection of a head
started from the target (`init_from_target`), gathered. Rank 0 writes them as JSON."""
import json
import os
import sys

import torch

from megatron_soaes.runtime import ParallelConfig, initialize


def main(head_ckpt, target_ckpt, out):
    world = int(os.environ["WORLD_SIZE"])
    initialize(ParallelConfig(tensor_parallel=world), seed=0)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_soaes.checkpoint.load import load_model_weights
    from megatron_soaes.checkpoint.meta import read_meta
    from megatron_soaes.heads.config import HeadConfig
    from megatron_soaes.heads.megatron import build_head, init_from_target
    from megatron_soaes.heads.task import DraftHeadTask
    from megatron_soaes.models import build_model
    from megatron_soaes.checkpoint.meta import read_model_config

    hcfg = HeadConfig.from_dict(read_meta(head_ckpt)["draft_head"])
    head = build_head(hcfg)
    load_model_weights(head, head_ckpt)
    target = build_model(read_model_config(target_ckpt), attention="sdpa")
    load_model_weights(target, target_ckpt)
    target.eval()
    feats = {}
    for i in {0, *hcfg.feature_layers}:
        if i == len(target.decoder.layers):  # MTP: the target's output after its final norm
            target.decoder.final_layernorm.register_forward_hook(lambda m, a, out, i=i: feats.__setitem__(i, out))
            continue
        target.decoder.layers[i].register_forward_pre_hook(
            lambda m, a, k, i=i: feats.__setitem__(i, k["hidden_states"] if "hidden_states" in k else a[0]), with_kwargs=True)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 4000, (2, 24), generator=g)
    seg = torch.ones_like(tokens)
    seg[1, 14:] = 2  # two examples packed in the second row
    with torch.no_grad():
        target(tokens, torch.arange(24).expand(2, 24), None)
    task = DraftHeadTask()
    task.hcfg, task.steps = hcfg, 3
    f = torch.cat([feats[i] for i in hcfg.feature_layers], -1)
    logits = torch.stack([head.logits(h).transpose(0, 1) for h in task.unroll(head, f, feats[0], seg)])  # [steps, b, s, K / tp]
    full = gather_from_tensor_model_parallel_region(logits)
    w = torch.randn(full.shape, generator=torch.Generator().manual_seed(2))
    (full * w).sum().backward()
    proj, qkv = head.projection.weight, head.transformer_layer.self_attention.linear_qkv.weight

    def whole(param, t):  # a column-parallel tensor of `param` gathered over TP; a replicated one as it is
        if not getattr(param, "tensor_model_parallel", False):
            return t
        parts = [torch.empty_like(t) for _ in range(ps.get_tensor_model_parallel_world_size())]
        torch.distributed.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
        return torch.cat(parts)

    proj_grad, qkv_grad = whole(proj, proj.grad), whole(qkv, qkv.grad)
    fresh = build_head(hcfg)
    init_from_target(fresh, target_ckpt)
    init_proj = whole(fresh.projection.weight, fresh.projection.weight.detach())
    if torch.distributed.get_rank() == 0:
        json.dump({"logits": full.tolist(), "fc_grad": proj_grad.tolist(), "qkv_grad": qkv_grad.tolist(),
                   "init_proj": init_proj.tolist(), "tokens": tokens.tolist()}, open(out, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
