"""Run under torchrun: a Qwen3-MoE model on megatron-core at TP/PP/EP on CPU against HF transformers --
the logits of a forward pass, then one training step's loss and every local gradient shard (experts by
their global index on this EP rank). Aux-loss coefficient 0 here (routing is unchanged by it).

With ADAPTER (an HF PEFT LoRA directory) the model carries that adapter (experts included) and the
reference is peft on transformers: the logits, the loss, and every adapter gradient (written as an adapter
checkpoint, converted to peft's names and compared on rank 0); the base must get no gradient.

Usage: torchrun --nproc-per-node N moe_vs_hf.py HF_DIR MCORE_DIR TP PP EP ETP OUT_JSON [ADAPTER]
(TP > 1 runs sequence parallelism, which megatron-core's MoE layers need with TP; ETP is the experts' TP)
"""

import sys

import torch

from train_step_vs_hf import local_shard, write_results


def main():
    hf_dir, mc_dir, tp, pp, ep, etp, out = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7]), sys.argv[7]
    adapter = sys.argv[8] if len(sys.argv) > 8 else None
    sp = tp > 1
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from transformers import AutoModelForCausalLM

    from megatron_soaes.checkpoint import qwen2_hf
    from megatron_soaes.checkpoint.load import load_model_weights
    from megatron_soaes.models import Qwen2Config, build_model
    from megatron_soaes.runtime import ParallelConfig, initialize

    initialize(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep, expert_tensor_parallel=etp,
                              sequence_parallel=sp))
    cfg = Qwen2Config.from_hf(hf_dir)
    cfg.router_aux_loss_coef = 0.0
    model = build_model(cfg, sequence_parallel=sp)
    load_model_weights(model, mc_dir)
    if adapter:
        from megatron_soaes.adapters.peft_io import attach_peft_adapter

        attach_peft_adapter(model, adapter, cfg)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    fb = get_forward_backward_func()

    gen = torch.Generator().manual_seed(1)
    n_micro, seq = 4, 16
    data = torch.randint(0, cfg.vocab_size, (n_micro, seq + 1), generator=gen)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        hf = PeftModel.from_pretrained(hf, adapter, is_trainable=True)
    ref_logits = hf(data[:, :-1]).logits

    # forward: the full-vocabulary logits of each micro-batch (last stage), vs HF's
    logits = []

    def fwd(it, m):
        toks, _ = next(it)
        out = m(toks, torch.arange(seq).unsqueeze(0), None)

        def keep(output):
            from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

            logits.append(gather_from_tensor_model_parallel_region(output)[..., :cfg.vocab_size].detach())
            return output.sum() * 0, {}

        return out, keep

    with torch.no_grad():
        fb(forward_step_func=fwd, data_iterator=iter([(d[None, :-1], d[None, 1:]) for d in data]), model=[ddp],
           num_microbatches=n_micro, seq_length=seq, micro_batch_size=1, forward_only=True)
    logit_diff = (torch.cat(logits) - ref_logits).abs().max().item() if logits else 0.0

    # one training step: loss and gradients
    ddp.zero_grad_buffer()

    def step(it, m):
        toks, labels = next(it)
        per_token = m(toks, torch.arange(seq).unsqueeze(0), None, labels=labels)

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach().clone()}

        return per_token, loss_func

    losses = fb(forward_step_func=step, data_iterator=iter([(d[None, :-1], d[None, 1:]) for d in data]), model=[ddp],
                num_microbatches=n_micro, seq_length=seq, micro_batch_size=1, forward_only=False)
    finalize_model_grads([ddp])
    ref_loss = torch.nn.functional.cross_entropy(ref_logits.reshape(-1, ref_logits.shape[-1]), data[:, 1:].reshape(-1))
    ref_loss.backward()
    if adapter:
        return compare_adapter_grads(model, hf, cfg, adapter, out, losses, n_micro, ref_loss.item(), logit_diff, len(logits))
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    if cfg.tie_word_embeddings:
        hf_grads.setdefault("lm_head.weight", hf_grads["model.embed_tokens.weight"])
    get = hf_grads.__getitem__
    fused = {i for i in range(cfg.num_layers) if f"model.layers.{i}.mlp.experts.gate_up_proj" in hf_grads}

    glob = qwen2_hf.hf_to_megatron_global(cfg, get)
    specs = {t.key: t for t in qwen2_hf.megatron_tensors(cfg)}
    tp_rank, etp_rank = ps.get_tensor_model_parallel_rank(), ps.get_expert_tensor_parallel_rank()
    offset = ps.get_pipeline_model_parallel_rank() * (cfg.num_layers // pp)
    local_experts = cfg.num_experts // ep
    first_expert = ps.get_expert_model_parallel_rank() * local_experts
    rename = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
              "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
    worst, compared, experts_seen = 0.0, 0, set()
    for name, p in model.named_parameters():
        if name.startswith("decoder.layers."):
            idx, rest = name[len("decoder.layers."):].split(".", 1)
            i = offset + int(idx)
            ref_layer = qwen2_hf.hf_to_megatron_layer(cfg, get, i, fused=i in fused)
            if ".local_experts." in rest:  # mlp.experts.local_experts.{j}.linear_fc1.weight
                j, lin = rest[len("mlp.experts.local_experts."):].split(".", 1)
                key = qwen2_hf.layer_key(cfg, "mlp.experts.experts." + lin, i)
                e = first_expert + int(j)
                ref = ref_layer[key].get(e)
                experts_seen.add((i, e))
                ref = local_shard(specs[key], ref, etp_rank, etp)  # an expert is split over the expert TP ranks
                worst = max(worst, (p.main_grad - ref).abs().max().item())
                compared += 1
                continue
            else:
                key = qwen2_hf.layer_key(cfg, rename.get(rest, rest), i)
                ref = ref_layer[key]
        elif name == "output_layer.weight" and cfg.tie_word_embeddings:
            continue
        else:
            key, ref = name, glob[name]
        ref = local_shard(specs[key], ref, tp_rank, tp)
        worst = max(worst, (p.main_grad - ref).abs().max().item())
        compared += 1

    write_results(out, losses, n_micro, ref_loss=ref_loss.item(), max_logit_diff=logit_diff, logits_compared=len(logits),
                  max_grad_diff=worst, compared=compared, experts=sorted(experts_seen))

def compare_adapter_grads(model, hf, cfg, adapter, out, losses, n_micro, ref_loss, logit_diff, n_logits):
    """Our adapter gradients (as an adapter checkpoint -> peft names) against peft's; the base has none."""
    from pathlib import Path

    from safetensors.torch import load_file

    from megatron_soaes.adapters import save_adapter
    from megatron_soaes.adapters.peft_io import adapter_section, to_peft

    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and
                        (p.grad is not None or getattr(p, "main_grad", None) is not None)]
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(p.main_grad)
    grads_dir = Path(out).with_suffix(".grads")
    save_adapter(model, grads_dir, cfg, adapter_section(adapter))
    worst, largest, names = None, None, 0
    if torch.distributed.get_rank() == 0:
        ours = load_file(str(to_peft(grads_dir, str(grads_dir) + "_peft") / "adapter_model.safetensors"))
        ref = {n.replace(".default", ""): p.grad for n, p in hf.named_parameters() if p.requires_grad}
        assert set(ref) == set(ours), sorted(set(ref) ^ set(ours))[:6]
        worst, names = max((ref[k] - ours[k]).abs().max().item() for k in ref), len(ref)
        largest = max(ref[k].abs().max().item() for k in ref)
    write_results(out, losses, n_micro, ref_loss=ref_loss, max_logit_diff=logit_diff, logits_compared=n_logits,
                  max_adapter_grad_diff=worst, max_adapter_grad=largest, adapter_tensors=names, frozen_with_grad=frozen_with_grad,
                  trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))


if __name__ == "__main__":
    main()
