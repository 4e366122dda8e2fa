"""Run under torchrun: one megatron-core fwd/bwd (pipeline schedule, DDP, finalize_model_grads)
at TP/PP on CPU, and compare the loss and every local gradient shard with HF transformers.

Usage: torchrun --nproc-per-node N train_step_vs_hf.py HF_DIR MCORE_DIR TP PP OUT_JSON [sp]
(sp: sequence parallelism on, with megatron_soaes' local-spec RMSNorm; no Transformer Engine)
"""

import json
import sys

import torch


def local_shard(t, tensor, tp_rank, tp):
    from megatron_soaes.checkpoint.qwen2_hf import tp_chunks

    chunks = [c for _, c in tp_chunks(t, tensor, tp)]
    if t.tp_dim is None or tp == 1:
        return chunks[0]
    if t.glu:
        return torch.cat([chunks[tp_rank], chunks[tp + tp_rank]])
    return chunks[tp_rank]


def write_results(out, losses, n_micro: int, **fields) -> None:
    """Every rank's figures in one JSON list, written by rank 0 (loss: the mean over micro-batches, last stage)."""
    from megatron.core import parallel_state as ps

    loss = sum(x["loss"].item() for x in losses) / n_micro if losses else 0.0
    results = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(results, {"rank": torch.distributed.get_rank(),
                                                  "last_stage": ps.is_pipeline_last_stage(), "loss": loss, **fields})
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)


def main():
    hf_dir, mc_dir, tp, pp, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    sp = sys.argv[6:] == ["sp"]
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from transformers import AutoModelForCausalLM

    from megatron_soaes.checkpoint import qwen2_hf
    from megatron_soaes.checkpoint.load import load_model_weights
    from megatron_soaes.models import Qwen2Config, build_model
    from megatron_soaes.runtime import ParallelConfig, initialize

    initialize(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=sp))
    cfg = Qwen2Config.from_hf(hf_dir)
    model = build_model(cfg, sequence_parallel=sp)
    assert model.config.sequence_parallel == sp
    load_model_weights(model, mc_dir)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    ddp.zero_grad_buffer()

    gen = torch.Generator().manual_seed(1)
    n_micro, seq = 4, 16
    data = torch.randint(0, cfg.vocab_size, (n_micro, seq + 1), generator=gen)
    batches = iter([(d[None, :-1], d[None, 1:]) for d in data])

    def step(it, m):
        toks, labels = next(it)
        pos = torch.arange(seq).unsqueeze(0)
        per_token = m(toks, pos, None, labels=labels)

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach().clone()}

        return per_token, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=step, data_iterator=batches, model=[ddp], num_microbatches=n_micro,
        seq_length=seq, micro_batch_size=1, forward_only=False)
    finalize_model_grads([ddp])

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    logits = hf(data[:, :-1]).logits
    ref_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1))
    ref_loss.backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    if cfg.tie_word_embeddings:
        hf_grads.setdefault("lm_head.weight", hf_grads["model.embed_tokens.weight"])

    # HF grads in megatron's global layout, per sharded key (stacked keys: per layer).
    glob = qwen2_hf.hf_to_megatron_global(cfg, hf_grads.__getitem__)
    specs = {t.key: t for t in qwen2_hf.megatron_tensors(cfg)}
    tp_rank = ps.get_tensor_model_parallel_rank()
    per_stage = cfg.num_layers // pp
    offset = ps.get_pipeline_model_parallel_rank() * per_stage
    rename = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
              "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
    worst, compared = 0.0, 0
    for name, p in model.named_parameters():
        if name.startswith("decoder.layers."):
            idx, rest = name[len("decoder.layers."):].split(".", 1)
            key = "decoder.layers." + rename.get(rest, rest)
            ref = qwen2_hf.hf_to_megatron_layer(cfg, hf_grads.__getitem__, offset + int(idx))[key]
        elif name == "output_layer.weight" and cfg.tie_word_embeddings:
            continue  # the last stage's copy of the tied embedding: same grad as the first stage's
        else:
            key = name
            ref = glob[key]
        ref = local_shard(specs[key], ref, tp_rank, tp)
        worst = max(worst, (p.main_grad - ref).abs().max().item())
        compared += 1

    write_results(out, losses, n_micro, ref_loss=ref_loss.item(), max_grad_diff=worst, compared=compared)

if __name__ == "__main__":
    main()
