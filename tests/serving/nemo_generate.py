"""Greedy generation through NeMo Export-Deploy's vLLM exporter (`nemo_export.vllm_exporter.vLLMExporter`,
run by tests/test_serving.py in the serving venv with Export-Deploy on PYTHONPATH): `export(model_format="hf")`
on our HF export, then its `forward` (top_k 1). Writes JSON.

Export-Deploy 0.4.0 pins vLLM 0.14.1 and passes `swap_space`, which later vLLM releases removed; with the
serving venv's vLLM 0.32.0 that one argument is dropped, the rest of the exporter runs as released."""

import argparse
import json
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import vllm
    from nemo_export import vllm_exporter
    from nemo_export_deploy_common.package_info import __version__

    released = vllm_exporter.LLM

    def llm(*a, swap_space=None, **kw):
        return released(*a, **kw)

    vllm_exporter.LLM = llm
    t0 = time.time()
    exporter = vllm_exporter.vLLMExporter()
    exporter.export(model_path_id=args.model, model_format="hf", dtype="float32", enforce_eager=True,
                    gpu_memory_utilization=0.1)
    started = time.time() - t0
    texts = json.load(open(args.prompts))["texts"]
    out = exporter.forward(texts, max_tokens=args.max_new_tokens, min_tokens=args.max_new_tokens, top_k=1)
    json.dump({"export_deploy": __version__, "vllm": vllm.__version__, "startup_s": round(started, 1),
               "sentences": out["sentences"], "token_ids": [list(t) for t in out["token_ids"]]},
              open(args.out, "w"), ensure_ascii=False)


if __name__ == "__main__":
    main()
