"""Rouge and BLEU-4 parity with rouge-chinese and sacrebleu (zh) on many pairs, incl. edge cases."""

import random

import pytest

from megatron_soaes.eval.metrics import corpus_bleu, rouge, rouge_pair, rouge_tokens


def _pairs(n=300, seed=0):
    """Real Chinese legal text (the demo QA answers when available) plus mutated copies."""
    rng = random.Random(seed)
    base = ["企业国有资产属于国家所有。国务院代表国家行使企业国有资产所有权。",
            "公司股东依法享有资产收益、参与重大决策和选择管理者等权利。",
            "会计机构、会计人员依照本法规定进行会计核算，实行会计监督。2024年第3条, A股 IPO-2.5%",
            "Hello, world! 国有独资公司设董事会, 依照本法第六十七条规定。",
            "审计机关对国有企业的资产、负债、损益，进行审计监督。"]
    out = []
    for _ in range(n):
        ref = rng.choice(base)
        chars = list(ref)
        for _ in range(rng.randint(0, 12)):
            op = rng.random()
            i = rng.randrange(len(chars)) if chars else 0
            if op < 0.4 and chars:
                del chars[i]
            elif op < 0.7:
                chars.insert(i, rng.choice("的国家企业资产公司法。，,. 1A"))
            elif chars:
                chars[i] = rng.choice("监督管理权利义务")
        out.append(("".join(chars), ref))
    return out


def test_rouge_matches_rouge_chinese():
    from rouge_chinese import Rouge

    pairs = _pairs()
    pairs += [("企业国有资产", "企业国有资产"), ("国", "国"), ("国", "家"), ("a b c", "a b c"), ("资产资产资产", "资产")]
    ref_pkg = Rouge()
    for level in ("char", "word"):
        for hyp, ref in pairs:
            theirs = ref_pkg.get_scores(" ".join(rouge_tokens(hyp, level)), " ".join(rouge_tokens(ref, level)))[0]
            ours = rouge_pair(hyp, ref, level)
            for k in ("rouge-1", "rouge-2", "rouge-l"):
                assert ours[k] == pytest.approx(theirs[k]["f"], abs=1e-9), (level, hyp, ref, k)
        hyps, refs = zip(*pairs)
        avg = ref_pkg.get_scores([" ".join(rouge_tokens(h, level)) for h in hyps],
                                 [" ".join(rouge_tokens(r, level)) for r in refs], avg=True)
        ours = rouge(list(hyps), list(refs), level)
        for k in ours:
            assert ours[k] == pytest.approx(avg[k]["f"], abs=1e-9)


def test_rouge_empty_strings():
    from rouge_chinese import Rouge

    hyps, refs = ["", "国有资产", "国有", " "], ["国有资产", "国有资产", "", "国"]
    kept = Rouge().get_scores([" ".join(rouge_tokens(h)) for h in hyps], [" ".join(rouge_tokens(r)) for r in refs],
                              avg=True, ignore_empty=True)
    ours = rouge(hyps, refs, ignore_empty=True)
    assert ours["rouge-1"] == pytest.approx(kept["rouge-1"]["f"])
    assert rouge(hyps, refs)["rouge-1"] == pytest.approx(kept["rouge-1"]["f"] / 4)  # empty pairs count as 0
    assert rouge(["国有资产"], ["国有资产"])["rouge-l"] == pytest.approx(1.0, abs=1e-7)


def test_bleu_matches_sacrebleu_zh():
    import sacrebleu

    pairs = _pairs(seed=1)
    hyps, refs = [h for h, _ in pairs], [r for _, r in pairs]
    for lo in range(0, len(pairs), 37):  # many corpora, including small ones
        h, r = hyps[lo:lo + 37], refs[lo:lo + 37]
        theirs = sacrebleu.corpus_bleu(h, [r], tokenize="zh").score
        assert corpus_bleu(h, r) == pytest.approx(theirs, abs=1e-9)
    for h, r in [("", "国有资产"), ("国有资产", "国有资产"), ("", ""), ("国", "国"), ("A.B, 1-2 x", "A.B, 1-2 y")]:
        assert corpus_bleu([h], [r]) == pytest.approx(sacrebleu.corpus_bleu([h], [[r]], tokenize="zh").score, abs=1e-9)
    assert corpus_bleu(["国有资产监督管理"], ["国有资产监督管理"]) == pytest.approx(100.0)


def test_degeneracy_tells_loops_and_constant_answers_from_answers():
    from megatron_soaes.eval.metrics import degeneracy, degenerate, is_loop

    assert is_loop("证券）证券）证券）证券）证券）") and is_loop("回答:《、、、、、、、、、、")
    assert not is_loop("企业国有资产属于国家所有。") and not is_loop("公司应当有自己的名称，名称权受法律保护。")
    collapsed = degeneracy(["证券）证券）证券）证券）证券）"] * 6)
    assert collapsed["loop_share"] == 1.0 and collapsed["identical_share"] == 1.0 and len(degenerate(collapsed)) == 3
    real = degeneracy(["企业国有资产属于国家所有。", "国务院代表国家行使所有权。", "公司股东依法享有资产收益权。",
                       "本法自2009年5月1日起施行。"])
    assert real["loop_share"] == 0 and real["identical_share"] == 0.25 and degenerate(real) == []
    assert degeneracy([])["answers"] == 0


def test_loop_detector_catches_long_period_loops_and_not_statutes():
    """Loops of a whole clause (periods up to 40 characters) are loops; real articles are not."""
    from megatron_soaes.eval.metrics import is_loop, rep_n

    samples = ["公司有权违法按照法律的规定，不得按照法律的规定，不得按照法",  # (the main job's answers once)
               "养老险的养老险股、养老险股的养老险股、养老险股的养老险股、养老险股的",
               "股东会应当对所议事项的决定作成会议记录，主持人、出席会议的董事签名。" * 2 + "股东会应当对所议事项",  # period 34
               "国有资产监督管理机构履行出资人职责，" * 3]
    assert all(is_loop(s) for s in samples)
    assert not any(is_loop(s, max_period=12) for s in samples[2:])  # what a short bound misses
    statutes = ["公司应当有自己的名称，名称权受法律保护。", "企业国有资产属于国家所有，即全民所有。国务院代表国家行使企业国有资产所有权。",
                "有限责任公司的股东会由全体股东组成。股东会是公司的权力机构，依照本法行使职权。股份有限公司的股东会由全体股东组成。"]
    assert not any(is_loop(s) for s in statutes)
    assert rep_n("abcdefgh") == 0.0 and rep_n("") == 0.0
    assert rep_n("证券证券证券证券") > 0.5 > rep_n(statutes[2]) > 0.0


def test_first_sentence_is_the_scored_unit():
    from megatron_soaes.eval.metrics import first_sentence

    assert first_sentence("公司应当有自己的名称。名称权受法律保护。") == "公司应当有自己的名称。"
    assert first_sentence("  第一款；第二款。") == "第一款；"
    assert first_sentence("没有句号" * 40, max_chars=10) == ("没有句号" * 3)[:10]


def test_bootstrap_intervals_and_paired_differences():
    """BLEU from resampled sufficient statistics is sacrebleu's corpus BLEU; an interval holds its mean and
    narrows with more items; a model paired with itself differs by 0; a clearly better one by more than 0."""
    import random

    from megatron_soaes.eval.metrics import corpus_bleu, rouge
    from megatron_soaes.eval.stats import intervals, item_scores, paired_difference

    rng = random.Random(0)
    chars = "企业国有资产法公司股东会董事监事资本出资人职责权利义务规定"
    refs = ["".join(rng.choice(chars) for _ in range(rng.randint(15, 40))) + "。" for _ in range(200)]
    good = [r[:len(r) * 3 // 4] + "的规定。" for r in refs]  # most of the reference
    bad = ["".join(rng.choice(chars) for _ in range(20)) + "。" for _ in refs]
    s_good, s_bad = item_scores(good, refs), item_scores(bad, refs)
    ci = intervals(s_good, resamples=300)
    assert abs(ci["bleu-4"]["mean"] - corpus_bleu(good, refs)) < 1e-9
    assert abs(ci["rouge-l"]["mean"] - 100 * rouge(good, refs)["rouge-l"]) < 1e-9
    for m in ci.values():
        assert m["lo"] <= m["mean"] <= m["hi"] and m["hi"] > m["lo"]
    small = intervals(item_scores(good[:20], refs[:20]), resamples=300)
    assert small["rouge-l"]["hi"] - small["rouge-l"]["lo"] > ci["rouge-l"]["hi"] - ci["rouge-l"]["lo"]
    same = paired_difference(s_good, s_good, resamples=200)
    assert all(d["diff"] == d["lo"] == d["hi"] == 0 for d in same.values())
    better = paired_difference(s_good, s_bad, resamples=300)
    assert all(d["lo"] > 0 and d["p_le_0"] == 0 for d in better.values())
    worse = paired_difference(s_bad, s_good, resamples=300)
    assert all(d["hi"] < 0 for d in worse.values())
