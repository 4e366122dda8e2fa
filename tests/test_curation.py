"""Curation (curation/): planted exact and near duplicates found, unrelated documents kept, planted
evaluation text removed and listed, the same result for any worker count and after a kill -9."""

import json
import random
import signal
import subprocess
import sys
import time

from conftest import ROOT, job_env


def _docs(path, n, min_chars=150):
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if len(rec["text"]) >= min_chars:
                out.append(rec)
            if len(out) >= n:
                break
    return out


def _write(path, recs):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return path


def _edit(text: str, rng: random.Random, k: int = 3) -> str:
    chars = list(text)
    for _ in range(k):
        chars[rng.randrange(len(chars))] = rng.choice("的了在是和有")
    return "".join(chars)


def _reorder(text: str, rng: random.Random) -> str:
    head, _, body = text.partition("\n")
    parts = [p for p in body.replace("。", "。\x00").split("\x00") if p]
    if len(parts) < 2:
        return None
    while True:
        shuffled = parts[:]
        rng.shuffle(shuffled)
        if shuffled != parts:
            return head + "\n" + "".join(shuffled)


def _reformat(text: str) -> str:
    """The same text to `rules.normalise`: full-width digits/letters, doubled spaces, trailing blanks."""
    return text.replace(" ", "  ").translate(str.maketrans("0123456789AB", "０１２３４５６７８９ＡＢ")) + "  \n"


def test_planted_duplicates_are_found_and_unrelated_documents_kept(cpt_data, tmp_path):
    from megatron_soaes.config.curation import CurationConfig
    from megatron_soaes.curation import curate

    cfg = CurationConfig(decontaminate=False)
    originals = _docs(cpt_data / "corpora" / "domain.train.jsonl", 500) + _docs(cpt_data / "corpora" / "general.train.jsonl", 100)
    # the unrelated set: what curation keeps of the originals alone (statutes have near-identical articles)
    s = curate({"orig": _write(tmp_path / "orig.jsonl", originals)}, tmp_path / "base", cfg, progress=False, log=lambda *_: None)
    unique = [json.loads(x) for x in open(tmp_path / "base" / "orig.jsonl", encoding="utf-8")]
    assert len(unique) >= 0.9 * len(originals), s["per_source"]
    rng = random.Random(0)
    planted, kind = [], {}
    for i, rec in enumerate(unique[:300]):
        how = ("exact", "edited", "reordered")[i % 3]
        text = {"exact": _reformat, "edited": lambda t: _edit(t, rng), "reordered": lambda t: _reorder(t, rng)}[how](rec["text"])
        if text is not None and text != rec["text"]:
            planted.append({"id": f"copy-{how}-{rec['id']}", "text": text})
            kind[planted[-1]["id"]] = how
    rng.shuffle(planted)
    assert len(planted) >= 250
    s = curate({"corpus": _write(tmp_path / "corpus.jsonl", unique), "copies": _write(tmp_path / "copies.jsonl", planted)},
               tmp_path / "out", cfg, progress=False, log=lambda *_: None)
    removed = [json.loads(x) for x in open(tmp_path / "out" / "removed.jsonl", encoding="utf-8")]
    found = {r["id"]: r["rule"] for r in removed if r["source"] == "copies"}
    recall = {h: sum(1 for p, k in kind.items() if k == h and p in found) / sum(1 for k in kind.values() if k == h)
              for h in ("exact", "edited", "reordered")}
    false_pos = sum(r["source"] == "corpus" for r in removed) / len(unique)
    print(f"\nplanted duplicates: recall {recall}, false positives {false_pos:.4f} of {len(unique)} unrelated documents")
    assert len(found) / len(planted) >= 0.95 and min(recall.values()) >= 0.9, recall
    assert all(found[p] == "exact_duplicate" for p, k in kind.items() if k == "exact" and p in found)
    assert false_pos <= 0.01
    assert s["per_source"]["corpus"]["kept"] == len(unique) - sum(r["source"] == "corpus" for r in removed)


def test_planted_evaluation_items_are_removed_and_listed(cpt_data, tmp_path):
    from megatron_soaes.config.curation import CurationConfig
    from megatron_soaes.curation import curate
    from megatron_soaes.curation.decontam import jsonl_items

    cfg = CurationConfig(near_dedup=False, exact_dedup=False)
    train = _docs(cpt_data / "corpora" / "domain.train.jsonl", 400, min_chars=20)
    tests = _docs(cpt_data / "corpora" / "domain.test.jsonl", 60, min_chars=160)
    items = list(jsonl_items(_write(tmp_path / "eval.jsonl", tests)))
    quiet = dict(progress=False, log=lambda *_: None)
    base = curate({"train": _write(tmp_path / "clean.jsonl", train)}, tmp_path / "base", cfg, items, **quiet)
    natural = base["per_source"]["train"]["removed"].get("contaminated", 0)
    rng = random.Random(1)
    planted = {}
    for t, i in zip(tests[:30], rng.sample(range(len(train)), 30)):  # an 80-character excerpt of a held-out document
        start = rng.randrange(len(t["text"]) - 80)  # pasted into a training document
        train[i] = {**train[i], "text": train[i]["text"] + "\n" + t["text"][start:start + 80]}
        planted[train[i]["id"]] = f"eval.jsonl#{t['id']}"
    curate({"train": _write(tmp_path / "train.jsonl", train)}, tmp_path / "out", cfg, items, **quiet)
    listed = {r["id"]: r["detail"]["item"] for r in map(json.loads, open(tmp_path / "out" / "contamination.jsonl", encoding="utf-8"))}
    assert all(listed.get(i) == item for i, item in planted.items() if i in listed) and set(planted) <= set(listed)
    assert len(listed) - len(planted) <= natural  # nothing else removed than what the clean corpus already had
    kept = [json.loads(x)["id"] for x in open(tmp_path / "out" / "train.jsonl", encoding="utf-8")]
    assert not set(kept) & set(planted)


def _run_curate(src, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "megatron_soaes.cli", "curate", "--source", f"domain={src}", "--out",
                             str(out), "--eval", str(src.with_name("domain.test.jsonl")), *extra],
                            env=job_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_curation_is_deterministic_and_resumes_after_kill(cpt_data, tmp_path):
    src = cpt_data / "corpora" / "domain.train.jsonl"
    ref = _run_curate(src, tmp_path / "ref", "--set", "workers=1")
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-2000:]
    killed = _run_curate(src, tmp_path / "killed", "--set", "workers=2", "--set", "checkpoint_every=1024")
    state = tmp_path / "killed" / ".curation_state.pkl"
    deadline = time.time() + 300
    while not state.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # past the save: the kill lands mid-batch
    assert killed.poll() is None, "finished before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "domain.jsonl").exists()  # no half-written output under its final name
    resumed = _run_curate(src, tmp_path / "killed", "--set", "workers=2", "--set", "checkpoint_every=1024")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert "resuming" in out + err
    for f in ("domain.jsonl", "removed.jsonl", "contamination.jsonl"):
        assert (tmp_path / "killed" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
    a, b = (json.loads((tmp_path / d / "curation.json").read_text()) for d in ("ref", "killed"))
    assert a["per_source"] == b["per_source"]


def test_bad_input_is_one_line_error(tmp_path):
    cli = lambda *a: subprocess.run([sys.executable, "-m", "megatron_soaes.cli", "curate", *map(str, a)],  # noqa: E731
                                    env=job_env(), cwd=ROOT, capture_output=True, text=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "企业国有资产属于国家所有，国务院代表国家行使企业国有资产所有权。"}\n{"text": 3}\nnot json\n', encoding="utf-8")
    for args, says in ((("--source", f"x={tmp_path / 'missing.jsonl'}"), "missing.jsonl: no such file"),
                       (("--source", f"x={bad}", "--eval", tmp_path / "nope.jsonl"), "nope.jsonl: no such file"),
                       (("--source", f"x={bad}", "--set", "near_threshold=2"), "near_threshold")):
        p = cli(*args, "--out", tmp_path / "o1")
        assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert not (tmp_path / "o1").exists()
    p = cli("--source", f"x={bad}", "--out", tmp_path / "o3")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(x) for x in open(tmp_path / "o3" / "removed.jsonl", encoding="utf-8")]
    assert [(r["where"].rsplit(":", 1)[1], r["rule"]) for r in rows] == [("2", "malformed"), ("3", "malformed")]


def test_knowledge_qa_pairs_are_leakage_while_their_articles_stay_in_cpt(cpt_data, tmp_path):
    """Knowledge QA asks about articles CPT trains on: a test question -> answer pair copied into an SFT set
    or a CPT document is removed, while the article itself stays in the CPT corpus (and an index of the
    references alone, the wrong rule, would have removed it)."""
    import shutil

    from megatron_soaes.config.curation import CurationConfig
    from megatron_soaes.curation.decontam import EvalIndex, jsonl_items
    from megatron_soaes.data.demo_data import CURATED, curate_demo_data, evaluation_items
    from megatron_soaes.data.sft_demo import build_sft_demo

    out = tmp_path / "data"
    shutil.copytree(cpt_data / "corpora", out / "corpora", ignore=shutil.ignore_patterns("*.bin", "*.idx"))
    build_sft_demo(out / "sft")
    tests = [json.loads(x) for x in open(out / "sft" / "soae_qa.test.jsonl", encoding="utf-8")]
    laws = {t["id"].split("#")[0] for t in tests}
    assert len(tests) >= 200 and len(laws) >= 5
    assert len({t["id"].split("#")[0] for t in tests[:20]}) >= 5  # hashed order: any prefix spans the laws
    domain = out / "corpora" / "domain.train.jsonl"
    articles = {r["id"]: r for r in map(json.loads, open(domain, encoding="utf-8"))}
    assert all(t["id"] in articles for t in tests)  # every test question asks about a CPT training document
    pair = tests[0]["messages"]
    with open(domain, "a", encoding="utf-8") as f:  # a CPT document that copies a test pair
        f.write(json.dumps({"id": "planted-pair", "text": f"{pair[1]['content']}\n{pair[2]['content']}"},
                           ensure_ascii=False) + "\n")
    with open(out / "sft" / "soae_qa.train.jsonl", "a", encoding="utf-8") as f:  # an SFT example that is a test pair
        f.write(json.dumps({"id": "planted-sft", "messages": tests[1]["messages"]}, ensure_ascii=False) + "\n")
    curate_demo_data(out, CurationConfig(near_dedup=False), log=lambda *_: None)
    kept_cpt = {json.loads(x)["id"] for x in open(out / CURATED / "domain.jsonl", encoding="utf-8")}
    kept_sft = {json.loads(x)["id"] for x in open(out / CURATED / "sft" / "soae_qa.jsonl", encoding="utf-8")}
    assert "planted-pair" not in kept_cpt and "planted-sft" not in kept_sft
    assert sum(t["id"] in kept_cpt for t in tests) >= 0.95 * len(tests)  # the knowledge stays
    wrong = EvalIndex(jsonl_items(out / "sft" / "soae_qa.test.jsonl"), 50, 16)  # references indexed alone
    assert sum(wrong.match(articles[t["id"]]["text"]) is not None for t in tests) >= 0.9 * len(tests)
    right = EvalIndex(evaluation_items(out, knowledge_pairs=50), 50, 16)
    assert right.match(articles[tests[0]["id"]]["text"]) is None


def test_every_record_shape_the_sft_reader_takes(tmp_path):
    """Curation and decontamination read records through the SFT reader (`utils.records`): the same
    conversation as messages, ShareGPT, Alpaca or ms-swift gives the same evaluation items, a training example
    in any shape that copies an evaluation answer is removed, and an evaluation file of an unknown shape is a
    one-line error naming its line."""
    from megatron_soaes.config.curation import CurationConfig
    from megatron_soaes.curation import curate
    from megatron_soaes.curation.decontam import jsonl_items

    q = "国家出资企业的监事会依照法律、行政法规以及企业章程的规定行使哪些职权？"
    a = "监事会对董事、高级管理人员执行职务的行为进行监督，对企业财务进行监督检查，并依法提出纠正意见。"
    shapes = {"messages": {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
              "sharegpt": {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
              "alpaca": {"instruction": q, "input": "", "output": a},
              "swift": {"query": q, "response": a}}
    texts = {n: [t for _, t in jsonl_items(_write(tmp_path / f"{n}.jsonl", [rec]))] for n, rec in shapes.items()}
    assert all(t == [q, a] for t in texts.values()), texts
    items = list(jsonl_items(tmp_path / "alpaca.jsonl"))
    other = {"instruction": "国有资本经营预算如何编制？", "output": "国有资本经营预算按年度单独编制，纳入本级人民政府预算。"}
    train = [{**shapes["swift"], "id": "copy"}, {**other, "id": "clean"}]
    cfg = CurationConfig(near_dedup=False, exact_dedup=False)
    curate({"sft": _write(tmp_path / "train.jsonl", train)}, tmp_path / "out", cfg, items, progress=False,
           log=lambda *_: None)
    kept = [json.loads(x)["id"] for x in open(tmp_path / "out" / "sft.jsonl", encoding="utf-8")]
    assert kept == ["clean"]
    unknown = _write(tmp_path / "unknown.jsonl", [{"question": q, "answer": a}])
    p = subprocess.run([sys.executable, "-m", "megatron_soaes.cli", "curate", "--source", f"x={tmp_path / 'train.jsonl'}",
                        "--eval", str(unknown), "--out", str(tmp_path / "o")], env=job_env(), cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "unknown.jsonl:1: unknown record shape" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
