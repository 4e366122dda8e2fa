"""Packed vs unpacked per-token SFT loss on one megatron model (any TP), written by rank 0.
Packed rows go through `kind`: the dense block-causal mask or FlexAttention's document mask; two
rows per micro-batch, so a mask that mixed rows or examples would show."""
import json
import sys

import torch

from megatron_soaes.runtime import ParallelConfig, initialize


def per_token_losses(model, rows, kind):
    from megatron_soaes.sft.task import packed_mask

    with torch.no_grad():
        return model(rows["tokens"], rows["position_ids"], packed_mask(rows["segment_ids"], kind), labels=rows["labels"])


def main(tp, out, kind="dense_mask"):
    initialize(ParallelConfig(tensor_parallel=int(tp)), seed=0)
    from megatron_soaes.data.sft import SFTExamples, pack
    from megatron_soaes.models import build_model, preset

    torch.manual_seed(0)
    cfg = preset("test")
    model = build_model(cfg, "fp32")
    model.eval()
    g = torch.Generator().manual_seed(1)
    lengths = [9, 17, 5, 12, 20, 3]
    ids = [torch.randint(3, 1000, (n,), generator=g).numpy() for n in lengths]
    masks = [(torch.rand(n, generator=g) > 0.4).to(torch.uint8).numpy() for n in lengths]
    ex = SFTExamples(ids, masks, list(range(len(ids))), {})
    packed = {k: torch.as_tensor(v) for k, v in pack(ex, 40, packing=True).items()}
    for k in ("tokens", "labels", "position_ids"):
        packed[k] = packed[k].long()
    assert packed["tokens"].shape[0] >= 2, "a micro-batch of several packed rows"
    lp = per_token_losses(model, packed, kind)
    res = {"max_diff": 0.0, "n": 0, "rows": packed["tokens"].shape[0],
           "packed_masked_sum": float((lp * packed["loss_mask"]).sum())}
    unpacked_sum = 0.0
    for i in range(len(ids)):
        one = {k: torch.as_tensor(v) for k, v in pack(SFTExamples([ids[i]], [masks[i]], [i], {}), lengths[i] - 1).items()}
        for k in ("tokens", "labels", "position_ids"):
            one[k] = one[k].long()
        lu = per_token_losses(model, one, kind)[0]
        r = next(r for r in range(packed["tokens"].shape[0]) if i in packed["example_hash"][r].tolist())
        where = packed["segment_ids"][r] == (packed["example_hash"][r].tolist().index(i) + 1)
        res["max_diff"] = max(res["max_diff"], float((lp[r][where] - lu).abs().max()))
        res["n"] += int(where.sum())
        unpacked_sum += float((lu * one["loss_mask"][0]).sum())
    res["unpacked_masked_sum"] = unpacked_sum
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
