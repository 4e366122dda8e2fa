"""Serving an exported target with its distilled draft under vLLM or SGLang: a dry run that checks
the pair and the layout before any engine starts, and the exact commands to run."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from megatron_soaes.heads.export import is_eagle3_dir
from megatron_soaes.models.config import Qwen2Config
from megatron_soaes.utils.files import read_json
from megatron_soaes.workflows.export import ExportError, check_pair


def check_serving(target, draft, tensor_parallel: int = 1, num_speculative_tokens: int = 3,
                  max_model_len: int | None = None, adapter=None) -> dict:
    """Everything an engine would refuse late (or run wrong): the draft fits the target (vocabulary,
    special tokens, context), the TP size divides the target's heads, the lengths fit; with `adapter` (an
    HF PEFT LoRA directory, `soaes peft to-hf`) that it is plain LoRA on the target's projections. An EAGLE-3
    head (`soaes convert head-to-eagle3`) is checked against the target's vocabulary, width and depth."""
    eagle3 = is_eagle3_dir(draft)
    if not eagle3:
        check_pair(target, draft)
    elif not (Path(target) / "config.json").exists():
        raise ExportError(f"{target}: not an exported model directory (config.json expected)")
    cfg = read_json(Path(target) / "config.json")
    if eagle3:
        check_eagle3(target, cfg, draft)
    for key in ("num_attention_heads", "num_key_value_heads"):
        n = cfg.get(key, cfg["num_attention_heads"])
        if n % tensor_parallel and tensor_parallel % n:
            raise ExportError(f"{target}: tensor parallel {tensor_parallel} does not divide {key} {n}")
    experts = Qwen2Config.from_hf(cfg).num_experts  # an MoE target (0: dense): experts over the TP ranks
    if experts and experts % tensor_parallel:
        raise ExportError(f"{target}: tensor parallel {tensor_parallel} does not divide num_experts {experts} "
                          "(expert parallelism puts num_experts / TP experts on each GPU)")
    if num_speculative_tokens < 1:
        raise ExportError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
    limit = cfg["max_position_embeddings"]
    if max_model_len and max_model_len > limit:
        raise ExportError(f"max_model_len {max_model_len} exceeds the target's max_position_embeddings {limit}")
    rank = None
    if adapter is not None:
        from megatron_soaes.adapters.peft_io import adapter_max_rank, adapter_section

        if adapter_section(adapter).dora:
            raise ExportError(f"{adapter}: vLLM and SGLang do not serve DoRA adapters; merge it into the base "
                              "(soaes peft merge, then export) and serve the merged model")
        rank = adapter_max_rank(adapter)  # an MoE adapter's experts' gate_up is rank 2r
    return {"target": str(target), "draft": str(draft), "eagle3": eagle3, "tensor_parallel": tensor_parallel,
            "num_speculative_tokens": num_speculative_tokens, "max_model_len": max_model_len or limit,
            "adapter": str(adapter) if adapter else None, "lora_rank": rank, "experts": experts or None}


def check_eagle3(target, target_cfg: dict, draft) -> None:
    """What vLLM and SGLang assume of an EAGLE-3 head: the target's vocabulary and width (its fc reads three of
    the target's hidden states), feature layers inside the target."""
    d = read_json(Path(draft) / "config.json")
    for key, want in (("vocab_size", "vocab_size"), ("target_hidden_size", "hidden_size")):
        if d.get(key) != target_cfg.get(want):
            raise ExportError(f"{draft}: EAGLE-3 head {key} {d.get(key)} != the target's {want} {target_cfg.get(want)} "
                              f"({target})")
    layers = target_cfg["num_hidden_layers"]
    ids = d.get("eagle_aux_hidden_state_layer_ids") or []
    if len(ids) != 3 or not all(0 <= i < layers for i in ids):
        raise ExportError(f"{draft}: eagle_aux_hidden_state_layer_ids {ids}: three layers of the target's {layers}")


LORA_NAME = "soaes"  # the adapter's name in the engines (requests select it as their model)


def vllm_command(target, draft, tensor_parallel: int, k: int, max_model_len: int, adapter=None, rank=None,
                 experts=None, port: int = 8000) -> list[str]:
    method = "eagle3" if is_eagle3_dir(draft) else "draft_model"
    spec = json.dumps({"method": method, "model": str(draft), "num_speculative_tokens": k})
    lora = ["--enable-lora", "--lora-modules", f"{LORA_NAME}={adapter}", "--max-lora-rank", str(rank)] if adapter else []
    ep = ["--enable-expert-parallel"] if experts and tensor_parallel > 1 else []  # experts split, not each one sliced
    return ["vllm", "serve", str(target), "--tensor-parallel-size", str(tensor_parallel), *ep, "--dtype", "bfloat16",
            "--max-model-len", str(max_model_len), "--speculative-config", spec, *lora, "--port", str(port)]


def sglang_command(target, draft, tensor_parallel: int, k: int, max_model_len: int, adapter=None, rank=None,
                   experts=None, port: int = 30000) -> list[str]:
    lora = ["--enable-lora", "--lora-paths", f"{LORA_NAME}={adapter}", "--max-lora-rank", str(rank)] if adapter else []
    ep = ["--ep-size", str(tensor_parallel)] if experts and tensor_parallel > 1 else []
    return ["python", "-m", "sglang.launch_server", "--model-path", str(target), "--tp", str(tensor_parallel), *ep,
            "--dtype", "bfloat16", "--context-length", str(max_model_len),
            "--speculative-algorithm", "EAGLE3" if is_eagle3_dir(draft) else "STANDALONE",
            "--speculative-draft-model-path", str(draft), "--speculative-num-steps", str(k),
            "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", str(k + 1), *lora, "--port", str(port)]


def describe(plan: dict) -> str:
    args = (plan["target"], plan["draft"], plan["tensor_parallel"], plan["num_speculative_tokens"], plan["max_model_len"],
            plan.get("adapter"), plan.get("lora_rank"), plan.get("experts"))
    return "\n".join([
        f"serving OK: target {plan['target']}, "
        + (f"EAGLE-3 head {plan['draft']} (the target's vocabulary, width and feature layers), " if plan.get("eagle3") else
           f"draft {plan['draft']} (same vocabulary and special tokens), ") +
        f"TP {plan['tensor_parallel']}, {plan['num_speculative_tokens']} speculative tokens, max_model_len "
        f"{plan['max_model_len']}" + (f", LoRA adapter {plan['adapter']} (rank {plan['lora_rank']}, request model "
                                        f"name {LORA_NAME!r})" if plan.get("adapter") else "")
        + (f", MoE target ({plan['experts']} experts; expert parallel over the TP ranks)" if plan.get("experts") else ""),
        "vLLM:   " + shlex.join(vllm_command(*args)),
        "SGLang: " + shlex.join(sglang_command(*args))])
