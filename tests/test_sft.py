"""SFT: chat rendering and answer-only loss, record shapes and errors, packing == unpacked (TP=1/2),
and the progressive curriculum (weights carried by value, resume mid-stage, single-stage union)."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from megatron_soaes.data.sft import SFTDataError, Template, pack, read_records, to_messages, tokenize_files


@pytest.fixture(scope="module")
def tok(cpt_data):
    from megatron_soaes.data.tokenizer import load_tokenizer

    return load_tokenizer(str(cpt_data / "spm.model"))


CONV = [{"role": "system", "content": "你是法律顾问。"}, {"role": "user", "content": "公司法第六条？"},
        {"role": "assistant", "content": "公司应当有自己的名称。"}, {"role": "user", "content": "还有呢？"},
        {"role": "assistant", "content": "名称权受法律保护。"}]


def test_template_masks_only_assistant_tokens(tok):
    ids, mask = Template().render(CONV, tok)
    text_of = lambda sel: tok.decode([i for i, m in zip(ids, mask) if m == sel])  # noqa: E731
    assert text_of(1).replace("<|im_end|>", "|") == "公司应当有自己的名称。|名称权受法律保护。|"
    assert ids.count(tok.im_end_id) == 5 and sum(mask[i] for i, t in enumerate(ids) if t == tok.im_end_id) == 2
    ids2, mask2 = Template(last_turn_only=True).render(CONV, tok)
    assert ids2 == ids and tok.decode([i for i, m in zip(ids2, mask2) if m]).startswith("名称权")
    prompt, pm = Template().render(CONV, tok, for_generation=True)
    assert not any(pm) and tok.decode(prompt).endswith("<|im_start|>assistant\n")


def test_record_shapes_render_identically(tok, tmp_path):
    recs = [{"messages": CONV},
            {"system": "你是法律顾问。", "query": "还有呢？", "response": "名称权受法律保护。",
             "history": [["公司法第六条？", "公司应当有自己的名称。"]]},
            {"conversations": [{"from": "system", "value": "你是法律顾问。"}, {"from": "human", "value": "公司法第六条？"},
                               {"from": "gpt", "value": "公司应当有自己的名称。"}, {"from": "human", "value": "还有呢？"},
                               {"from": "gpt", "value": "名称权受法律保护。"}]}]
    outs = {json.dumps(to_messages(r, "x"), ensure_ascii=False) for r in recs}
    assert len(outs) == 1
    alp = to_messages({"instruction": "解释", "input": "公司法第六条", "output": "名称。"}, "x")
    assert alp[0]["content"] == "解释\n公司法第六条" and alp[1]["role"] == "assistant"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"instruction": "a", "output": "b"}]), tmp_path / "d.parquet")
    assert [r for _, r in read_records(tmp_path / "d.parquet")][0]["output"] == "b"


def test_bad_sft_records_name_file_and_line(tok, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"messages": CONV}, ensure_ascii=False) + "\n{not json\n"
                 + json.dumps({"messages": [{"role": "user", "content": "只有问题"}]}, ensure_ascii=False) + "\n")
    with pytest.raises(SFTDataError, match=rf"{p}:2: malformed JSON"):
        tokenize_files([(str(p), 1)], tok, 128, Template(), progress=False)
    p.write_text(json.dumps({"messages": CONV}, ensure_ascii=False) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "只有问题"}]}, ensure_ascii=False) + "\n")
    with pytest.raises(SFTDataError, match=rf"{p}:2: no assistant turn"):
        tokenize_files([(str(p), 1)], tok, 128, Template(), progress=False)
    ex = tokenize_files([(str(p), 1)], tok, 128, Template(), strict=False, progress=False)
    assert ex.stats["examples"] == 1 and ex.stats["bad_records"] == 1
    p.write_bytes(b'{"messages": []}\n\xff\xfe\n')
    with pytest.raises(SFTDataError, match=rf"{p}:1: messages must be a non-empty list"):
        tokenize_files([(str(p), 1)], tok, 128, Template(), progress=False)


def test_truncation_policies(tok, tmp_path):
    p = tmp_path / "long.jsonl"
    long = {"messages": [{"role": "user", "content": "问" * 10}, {"role": "assistant", "content": "答" * 200}]}
    p.write_text(json.dumps(long, ensure_ascii=False) + "\n")
    ex = tokenize_files([(str(p), 1)], tok, 64, Template(None), progress=False)
    assert ex.stats["truncated"] == 1 and len(ex.ids[0]) == 65
    ex = tokenize_files([(str(p), 1)], tok, 64, Template(None), truncation="drop", progress=False)
    assert ex.stats["dropped_too_long"] == 1 and not ex.ids


def test_packing_layout(tok):
    from megatron_soaes.data.sft import SFTExamples

    ids = [np.arange(1, n + 1, dtype=np.int32) for n in (10, 7, 4, 12)]
    masks = [np.ones(len(x), dtype=np.uint8) for x in ids]
    rows = pack(SFTExamples(ids, masks, [1, 2, 3, 4], {}), 20)
    assert rows["tokens"].shape == (2, 20)  # 11 + 9 + 6 + 3 positions -> two rows
    for r in range(2):
        for s in range(1, rows["segment_ids"][r].max() + 1):
            sel = rows["segment_ids"][r] == s
            assert (rows["position_ids"][r][sel] == np.arange(sel.sum())).all()
            assert (rows["labels"][r][sel] == rows["tokens"][r][sel] + 1).all()  # labels never cross examples
    assert sorted(rows["example_hash"][rows["example_hash"] > 0].tolist()) == [1, 2, 3, 4]


def test_answer_only_loss_ignores_prompt_labels(tok):
    """Prompt/system tokens contribute exactly zero loss and gradient; every assistant token counts."""
    from megatron_soaes.models import build_model, preset
    from megatron_soaes.runtime import ParallelConfig, initialize
    from megatron_soaes.sft.task import block_causal_mask
    from megatron_soaes.training import masked_token_loss

    initialize(ParallelConfig(), seed=0)
    model = build_model(preset("test", vocab_size=4096), "fp32")
    ex = tokenize_files([], tok, 128, Template(), progress=False, extra=[CONV])
    rows = {k: torch.as_tensor(v) for k, v in pack(ex, 128).items()}
    for k in ("tokens", "labels", "position_ids"):
        rows[k] = rows[k].long()

    def loss_and_grads(labels):
        model.zero_grad()
        per_tok = model(rows["tokens"], rows["position_ids"], block_causal_mask(rows["segment_ids"]), labels=labels)
        total, n, _ = masked_token_loss(rows["loss_mask"], per_tok)
        (total / n).backward()
        return float(total / n), [p.grad.clone() for p in model.parameters()]

    base, g0 = loss_and_grads(rows["labels"])
    prompt = rows["loss_mask"][0] == 0
    scrambled = rows["labels"].clone()
    scrambled[0, prompt] = (scrambled[0, prompt] + 17) % 4000
    same, g1 = loss_and_grads(scrambled)
    assert same == base and all(torch.equal(a, b) for a, b in zip(g0, g1))
    target = torch.nonzero(~prompt[:ex.stats["tokens"] - 1])
    for pos in (target[0, 0], target[-1, 0]):  # first and last assistant tokens both count
        changed = rows["labels"].clone()
        changed[0, pos] = (changed[0, pos] + 1) % 4000
        assert loss_and_grads(changed)[0] != base


@pytest.mark.parametrize("tp,kind", [(1, "dense_mask"), (2, "dense_mask"), (1, "flex"), (2, "flex")])
def test_packed_loss_equals_unpacked(tmp_path, tp, kind):
    """Dense block-causal mask and FlexAttention's document mask (the no-TE path for micro-batch > 1)."""
    from conftest import ROOT, read_json, torchrun

    torchrun(tp, ROOT / "tests" / "workers" / "sft_packing.py", tp, tmp_path / "out.json", kind)
    res = read_json(tmp_path / "out.json")
    assert res["n"] == 60 and res["rows"] >= 2 and res["max_diff"] < 1e-5
    assert res["packed_masked_sum"] == pytest.approx(res["unpacked_masked_sum"], rel=1e-6)


# ---------------- the curriculum ----------------

def write_recipe(d, spm, out, **over):
    stages = [{"name": n, "train": [str(d / f"{n}.train.jsonl")], "valid": {n: [str(d / f"{n}.valid.jsonl")]},
               "epochs": 1} for n in ("consultation", "recitation", "soae_qa")]
    stages[2]["epochs"] = 2
    recipe = {"name": "t", "output_dir": str(out), "init_checkpoint": str(d / "base"),
              "job": {"model": {"preset": "test", "overrides": {"vocab_size": 4096}},
                      "data": {"tokenizer": str(spm), "seq_length": 128},
                      "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 0},
                      "train": {"global_batch_size": 4, "micro_batch_size": 2, "dtype": "fp32",
                                "log_interval": 1, "eval_iters": 1, "save_interval": 2, "keep_last": 5},
                      "sft": {"default_system": None}},
              "stages": stages,
              "evaluation": {"qa": str(d / "soae_qa.test.jsonl"), "limit": 3, "max_new_tokens": 8}}
    for k, v in over.items():
        recipe[k] = v
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, open(run / "metrics.jsonl")) if "loss" in r}


def test_curriculum_chains_stages_and_resumes(small_sft, cpt_data, tmp_path):
    from megatron_soaes.checkpoint.dcp_io import DcpReader
    from megatron_soaes.checkpoint.load import resolve_checkpoint
    from megatron_soaes.config.curriculum import OptimPatch, load_recipe
    from megatron_soaes.workflows.curriculum import run_curriculum

    out = tmp_path / "prog"
    recipe = load_recipe(write_recipe(small_sft, cpt_data / "spm.model", out))
    recs = run_curriculum(recipe, log=lambda s: None)
    assert [r.stage for r in recs] == [1, 2, 3]
    for r in recs:
        assert set(r.qa) >= {"rouge-1", "rouge-2", "rouge-l", "bleu-4"}
        assert (out / f"stage{r.stage}_{r.name}" / "qa_answers.jsonl").exists()
    # the run's config dump names the attention, the packed-rows path and the fusions (all off on CPU)
    dump = json.loads((out / "stage1_consultation" / "resolved_config.json").read_text())
    assert dump["attention"] == "sdpa" and dump["job"]["sft"]["packed_attention"] == "dense_mask"
    assert dump["fusions"]["bias_activation_fusion"] is False and dump["fusions"]["cross_entropy_fusion_impl"] == "native"
    # stage k+1 started from stage k's final checkpoint
    assert recs[1].init_checkpoint == recs[0].checkpoint and recs[2].init_checkpoint == recs[1].checkpoint
    # re-running skips finished stages
    again = run_curriculum(recipe, log=lambda s: None)
    assert again == recs

    # by value: with a (practically) zero learning rate, stage 2 ends where stage 1 ended
    frozen = tmp_path / "frozen"
    r2 = load_recipe(write_recipe(small_sft, cpt_data / "spm.model", frozen))
    r2.stages[1].optim = OptimPatch(lr=1e-30, min_lr=0.0)
    run_curriculum(r2, "1-2", log=lambda s: None)
    a = DcpReader(resolve_checkpoint(frozen / "stage1_consultation"))
    b = DcpReader(resolve_checkpoint(frozen / "stage2_recitation"))
    base = DcpReader(small_sft / "base")
    key = "decoder.layers.self_attention.linear_qkv.weight"
    assert torch.allclose(a.read(key), b.read(key), atol=1e-12)
    assert not torch.allclose(a.read(key), base.read(key))
    # stage 3 alone is fine now that stage 2 is done; stage 3 without stage 2 is a clear error
    with pytest.raises(Exception, match="has not finished"):
        run_curriculum(load_recipe(write_recipe(small_sft, cpt_data / "spm.model", tmp_path / "empty")), "3",
                       log=lambda s: None)

    # kill in the middle of stage 2 (after its step-2 checkpoint), rerun: identical losses
    killed = tmp_path / "killed"
    shutil.copytree(out / "stage1_consultation", killed / "stage1_consultation")
    s2 = out / "stage2_recitation"
    steps2 = recs[1].steps
    assert steps2 > 2
    shutil.copytree(s2 / "checkpoints" / "iter_0000002", killed / "stage2_recitation" / "checkpoints" / "iter_0000002")
    rk = load_recipe(write_recipe(small_sft, cpt_data / "spm.model", killed))
    rk_recs = run_curriculum(rk, log=lambda s: None)
    full, resumed = _losses(s2), _losses(killed / "stage2_recitation")
    assert sorted(resumed) == list(range(3, steps2 + 1))
    assert all(resumed[s] == full[s] for s in resumed)
    assert rk_recs[2].final_train_loss == pytest.approx(recs[2].final_train_loss, rel=1e-6)

    # force on stage 2: trained again from scratch (its steps run again, deterministically) and stage 3,
    # which started from it, removed as stale
    log = []
    redo = run_curriculum(recipe, "2", force=True, log=log.append)
    assert [r["step"] for r in map(json.loads, open(s2 / "metrics.jsonl")) if "loss" in r] == list(range(1, steps2 + 1))
    assert any(line.startswith(f"step {steps2}/{steps2}") for line in log)
    assert redo[0].final_train_loss == pytest.approx(recs[1].final_train_loss, rel=1e-6)
    assert not (out / "stage3_soae_qa").exists() and any("stale" in line for line in log)


def test_single_stage_baseline_sees_the_union(small_sft, cpt_data, tmp_path):
    from megatron_soaes.data.tokenizer import load_tokenizer
    from megatron_soaes.config.curriculum import load_recipe, single_stage, stage_job
    from megatron_soaes.sft.task import train_rows

    tok = load_tokenizer(str(cpt_data / "spm.model"))
    recipe = load_recipe(write_recipe(small_sft, cpt_data / "spm.model", tmp_path / "p"))

    def hashes(job):
        rows, _ = train_rows(job, tok, progress=False)
        h = rows["example_hash"]
        return sorted(h[h > 0].tolist())

    # what the stages train on: each stage's examples, as many times as its epochs (stage 3: 2)
    union = sorted(sum((hashes(stage_job(recipe, k, "x", tmp_path / f"s{k}")) * int(recipe.stages[k - 1].epochs)
                        for k in (1, 2, 3)), []))
    base = single_stage(recipe)
    assert len(base.stages) == 1 and base.stages[0].epochs == 1
    assert hashes(stage_job(base, 1, "x", tmp_path / "single")) == union  # the same multiset of examples
    assert 80 <= len(union) <= 24 * 4  # 24 records per stage (stage 3 twice), minus those truncated to no target
    # stages given in steps: the baseline at equal cost -- their summed steps, the same batch, over the union
    stepped = recipe.model_copy(update={"stages": [s.model_copy(update={"epochs": None, "steps": k + 2})
                                                   for k, s in enumerate(recipe.stages)]})
    eq = single_stage(stepped)
    assert eq.stages[0].steps == 2 + 3 + 4 and eq.stages[0].epochs is None
    assert [f.path for f in eq.stages[0].files()] == [f.path for s in recipe.stages for f in s.files()]
    jobs = [stage_job(eq, 1, "x", tmp_path / "eq"), stage_job(stepped, 3, "x", tmp_path / "s3")]
    assert jobs[0].train.steps == 9 and jobs[0].train.global_batch_size == jobs[1].train.global_batch_size
