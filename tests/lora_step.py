"""One training step of base + LoRA adapter on megatron-core (run under torchrun): writes the loss and the
adapters' gradients, saved as an adapter checkpoint (`--out`), for test_peft to hold against peft's."""

import argparse
import json
from pathlib import Path

import torch

from megatron_soaes.adapters import apply_lora, save_adapter
from megatron_soaes.adapters.peft_io import adapter_section, from_peft
from megatron_soaes.checkpoint.convert import hf_to_megatron
from megatron_soaes.checkpoint.load import load_adapter, load_model_weights
from megatron_soaes.models import Qwen2Config, build_model
from megatron_soaes.models.forward import position_ids_for
from megatron_soaes.runtime import ParallelConfig, initialize


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--sp", action="store_true")
    args = ap.parse_args()
    initialize(ParallelConfig(tensor_parallel=args.tp), seed=0)
    from megatron.core import parallel_state as ps

    out = Path(args.out)
    cfg = Qwen2Config.from_hf(args.hf)
    if torch.distributed.get_rank() == 0:
        hf_to_megatron(args.hf, out / "base", progress=False, overwrite=True)
        from_peft(args.adapter, cfg, out / "adapter_in")
    torch.distributed.barrier()
    peft = adapter_section(args.adapter)
    model = build_model(cfg, dtype="fp32", sequence_parallel=args.sp)
    apply_lora(model, peft, cfg)
    load_model_weights(model, out / "base")
    load_adapter(model, out / "adapter_in")
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    inp, labels = tokens[:, :-1], tokens[:, 1:]
    loss = model(inp, position_ids_for(inp), attention_mask=None, labels=labels).float().mean()
    loss.backward()
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    for p in model.parameters():
        if p.grad is not None and getattr(p, "sequence_parallel", False):  # what finalize_model_grads does
            torch.distributed.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(p.grad)
    save_adapter(model, out / "grads", cfg, peft)
    if torch.distributed.get_rank() == 0:
        (out / "loss.json").write_text(json.dumps({"loss": loss.item(), "frozen_with_grad": frozen_with_grad,
                                                   "trainable": [n for n, p in model.named_parameters() if p.requires_grad]}))


if __name__ == "__main__":
    main()
