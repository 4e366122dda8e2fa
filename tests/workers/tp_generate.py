"""Run under torchrun: the inference model split over the ranks (tensor parallel) against the same
model unsplit on every rank: logits, greedy, seeded sampling and speculative decoding (draft replicated).

Usage: torchrun --nproc-per-node 2 tp_generate.py TARGET_DIR DRAFT_DIR OUT_JSON
"""

import json
import sys

import torch


def main():
    target_dir, draft_dir, out = sys.argv[1:4]
    from megatron_soaes.inference import generate, load_inference_model
    from megatron_soaes.inference.tp import TensorParallel
    from megatron_soaes.runtime import ParallelConfig, initialize
    from megatron_soaes.speculative import SpecConfig, speculative_generate

    initialize(ParallelConfig(tensor_parallel=int(torch.distributed.get_world_size()
                                                  if torch.distributed.is_initialized() else 2)))
    tp = TensorParallel.from_env()
    split, whole = load_inference_model(target_dir, tp=tp), load_inference_model(target_dir)
    draft = load_inference_model(draft_dir)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, whole.vocab_size, (n,), generator=g).tolist() for n in (13, 1, 6, 20)]
    toks = torch.tensor([p[:6] for p in prompts if len(p) >= 6])
    pos = torch.arange(6).expand(len(toks), 6)
    diff = (split.forward(toks, pos, split.new_cache(len(toks), 8)) -
            whole.forward(toks, pos, whole.new_cache(len(toks), 8))).abs().max().item()
    res = {"tp": tp.size, "local_heads": split.heads, "local_kv_heads": split.kv_heads, "logit_diff": diff,
           "cache_heads": split.new_cache(1, 4).k.shape[2]}
    ref = generate(whole, prompts, 20).tokens
    res["greedy"] = generate(split, prompts, 20).tokens == ref
    res["sampled"] = (generate(split, prompts, 20, temperature=0.8, top_p=0.9, seed=3).tokens ==
                      generate(whole, prompts, 20, temperature=0.8, top_p=0.9, seed=3).tokens)
    for name, spec in (("chain", SpecConfig("chain", gamma=3)), ("tree", SpecConfig("tree", branching=(2, 1)))):
        a = speculative_generate(split, draft, prompts, 20, spec)
        res[name] = a.tokens == ref == speculative_generate(whole, draft, prompts, 20, spec).tokens
        s1 = speculative_generate(split, draft, prompts, 20, spec, temperature=0.8, seed=5).tokens
        res[f"{name}_sampled"] = s1 == speculative_generate(whole, draft, prompts, 20, spec, temperature=0.8, seed=5).tokens
    results = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(results, res)
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
