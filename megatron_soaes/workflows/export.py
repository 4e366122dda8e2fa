"""Export for inference: a megatron-soaes checkpoint -> an HF safetensors directory with config,
generation config, tokenizer files and the Qwen2 chat template, which `transformers` loads (and
vLLM / SGLang / NeMo Export-Deploy accept as a Qwen2ForCausalLM directory)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megatron_soaes.utils.files import atomic_write_json

CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def export_hf(checkpoint, out_dir, tokenizer_spec: str, dtype: str | None = "bf16", overwrite: bool = True) -> Path:
    from megatron_soaes.checkpoint.convert import megatron_to_hf
    from megatron_soaes.data.tokenizer import load_tokenizer

    out = megatron_to_hf(checkpoint, out_dir, dtype=dtype, overwrite=overwrite, progress=False)
    tok = load_tokenizer(tokenizer_spec)
    specials = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    cfg = {"chat_template": CHAT_TEMPLATE, "model_max_length": 32768, "clean_up_tokenization_spaces": False, **specials}
    src = Path(tokenizer_spec)
    if tokenizer_spec == "qwen" or src.suffix == ".tiktoken":
        from megatron_soaes.data.tokenizer import QwenTiktokenTokenizer

        qt = tok if isinstance(tok, QwenTiktokenTokenizer) else QwenTiktokenTokenizer(src)
        qt.save_tokenizer_json(out)  # tokenizer.json with the Qwen2 BPE and its specials
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    elif src.suffix == ".model":
        shutil.copy2(src, out / "tokenizer.model")  # sentencepiece (identity normalisation, no dummy prefix)
        cfg["tokenizer_class"] = "LlamaTokenizer"
        cfg["add_dummy_prefix_space"] = False
    elif src.is_dir():
        for f in src.iterdir():
            if f.name.startswith("tokenizer") or f.name in ("vocab.json", "merges.txt"):
                shutil.copy2(f, out / f.name)
    atomic_write_json(out / "tokenizer_config.json", cfg)
    atomic_write_json(out / "generation_config.json",
                      {"eos_token_id": [tok.im_end_id, tok.eod_id], "pad_token_id": tok.eod_id, "do_sample": False})
    atomic_write_json(out / "soaes_export.json", {"source": str(checkpoint), "tokenizer": tokenizer_spec})
    return out


def check_export(hf_dir, source_checkpoint=None, seq_len: int = 24) -> dict:
    """Load the export with transformers and compare its logits with our engine on the source checkpoint."""
    from transformers import AutoModelForCausalLM

    from megatron_soaes.inference.model import load_inference_model

    hf_dir = Path(hf_dir)
    src = source_checkpoint or json.loads((hf_dir / "soaes_export.json").read_text())["source"]
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ours = load_inference_model(src)
    toks = torch.randint(0, ours.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = hf(toks).logits.float()
    b = ours.forward(toks, torch.arange(seq_len)[None], ours.new_cache(1, seq_len))
    diff = (a - b).abs().max().item()
    return {"loads_in_transformers": True, "max_abs_logit_diff_vs_source": diff,
            "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}
