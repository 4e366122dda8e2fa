"""Speculative decoding: inference model parity, lossless greedy and sampling, KV-cache rollback,
native tree-verify op vs the PyTorch oracle."""

import math

import pytest
import torch

from megatron_soaes.inference import generate
from megatron_soaes.speculative.decode import SpecConfig, speculative_generate
from megatron_soaes.inference.model import load_inference_model
from megatron_soaes.speculative.verify import native_available, tree_verify, tree_verify_reference


@pytest.fixture(scope="module")
def pair(hf_models, tmp_path_factory):
    from megatron_soaes.models.random_init import make_random_hf_model

    d = tmp_path_factory.mktemp("draft")
    make_random_hf_model(d, "test", seed=7, num_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    return load_inference_model(hf_models["untied"]), load_inference_model(d)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("name", ["tied", "untied", "odd_vocab"])
def test_inference_model_matches_hf(hf_models, name, packed, monkeypatch):
    """Also with every weight pre-packed for oneDNN (normally only the large ones are)."""
    from megatron_soaes.checkpoint.compare import hf_logits
    from megatron_soaes.inference.model import Linear

    monkeypatch.setattr(Linear, "MIN_PACKED", 0)
    m = load_inference_model(hf_models[name], packed=packed)
    if packed and torch.backends.mkldnn.is_available():
        assert all(L["qkv"].packed is not None for L in m.layers) and m.lm_head.packed is not None
    toks = torch.randint(0, m.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = hf_logits(hf_models[name], toks)
    cache = m.new_cache(2, 32)
    full = m.forward(toks, torch.arange(16).expand(2, 16), cache)
    assert (full - ref).abs().max() < 1e-5
    cache = m.new_cache(2, 32)  # prefill 9, then token by token
    outs = [m.forward(toks[:, :9], torch.arange(9).expand(2, 9), cache)]
    cache.lengths += 9
    for j in range(9, 16):
        outs.append(m.forward(toks[:, j:j + 1], torch.full((2, 1), j), cache))
        cache.lengths += 1
    assert (torch.cat(outs, 1) - ref).abs().max() < 1e-5


def test_option_scores_share_the_prefix_and_match_transformers(hf_models):
    """MCQ/cloze options scored as branches of one tree forward equal transformers' log-probabilities of
    each prefix + option sequence run alone (and a wrong branch mask would let options see each other)."""
    from megatron_soaes.checkpoint.compare import hf_logits
    from megatron_soaes.eval.ability import option_scores

    model = load_inference_model(hf_models["untied"])
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, 200, (9,), generator=g).tolist()
    options = [torch.randint(0, 200, (k,), generator=g).tolist() for k in (1, 4, 2, 6)]
    got = option_scores(model, prefix, options)
    for opt, score in zip(options, got):
        seq = prefix + opt
        lp = torch.log_softmax(hf_logits(hf_models["untied"], torch.tensor([seq]))[0], -1)
        ref = lp[len(prefix) - 1:len(seq) - 1].gather(-1, torch.tensor(opt)[:, None]).mean().item()
        assert score == pytest.approx(ref, abs=1e-4)


def test_inference_model_from_megatron_checkpoint(hf_models, tmp_path):
    from megatron_soaes.checkpoint.convert import hf_to_megatron

    hf_to_megatron(hf_models["tied"], tmp_path / "mc", 2, 2, progress=False)
    a, b = load_inference_model(hf_models["tied"]), load_inference_model(tmp_path / "mc")
    toks = torch.randint(0, a.vocab_size, (1, 10))
    pos = torch.arange(10)[None]
    assert torch.equal(a.forward(toks, pos, a.new_cache(1, 16)), b.forward(toks, pos, b.new_cache(1, 16)))


SPECS = [SpecConfig("chain", gamma=1), SpecConfig("chain", gamma=5), SpecConfig("tree", branching=(3, 2, 1)),
         SpecConfig("tree", branching=(1, 4)), SpecConfig("dynamic", topk=3, depth=4, budget=12),
         SpecConfig("dynamic", topk=2, depth=6, budget=6)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.mode}-{s.max_nodes}")
def test_greedy_speculative_equals_target_greedy(pair, spec):
    target, draft = pair
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, target.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 20, (5,), generator=g)]
    for n_new in (1, 7, 33):
        ref = generate(target, prompts, n_new)
        for d in (draft, target):  # a random draft (rejects nearly everything) and a perfect one
            out = speculative_generate(target, d, prompts, n_new, spec)
            assert out.tokens == ref.tokens
        # each prompt alone gives the same tokens as in the batch
    for b in (0, 3):
        assert speculative_generate(target, draft, [prompts[b]], 33, spec).tokens[0] == ref.tokens[b]


@pytest.fixture(scope="module")
def near_target(hf_models):
    """A draft that agrees with the target most of the time: its weights plus small noise."""
    from megatron_soaes.inference.model import Qwen2ForInference, load_weights

    cfg, w = load_weights(hf_models["untied"])
    g = torch.Generator().manual_seed(3)
    return Qwen2ForInference(cfg, {k: v + 0.02 * v.std() * torch.randn(v.shape, generator=g) for k, v in w.items()})


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.mode}-{s.max_nodes}")
def test_ragged_batch_with_a_good_draft_finishes_rows_in_different_rounds(pair, near_target, spec):
    """Rows finish (length or EOS) in different rounds and are frozen from then on: no cache overflow,
    output = target-only greedy (this crashed with 'KV cache ... too small' before)."""
    target, _ = pair
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, target.vocab_size, (int(n),), generator=g).tolist() for n in (30, 1, 3, 9, 17)]
    for n_new in (7, 40):  # the longest prompt's row finishes first
        ref = generate(target, prompts, n_new)
        out = speculative_generate(target, near_target, prompts, n_new, spec)
        assert out.tokens == ref.tokens and out.tau > 1.5  # the draft is accepted often
        eos = ref.tokens[0][2]  # a token row 0 emits early: rows stop at different rounds
        ref_eos = generate(target, prompts, n_new, eos_id=eos)
        assert speculative_generate(target, near_target, prompts, n_new, spec, eos_id=eos).tokens == ref_eos.tokens


def test_static_shapes_give_the_same_tokens(hf_models, near_target):
    """The CUDA-graph-ready forward (whole cache under a mask, RoPE table sized with the cache, no host
    sync) decodes exactly as the dynamic one: target-only and speculative, ragged batch, every mode.
    On CPU there is no capture (`cuda_graphs` refuses a CPU device); the GPU check measures it."""
    from megatron_soaes.inference.model import Qwen2ForInference, load_weights

    cfg, w = load_weights(hf_models["untied"])
    dyn, static = Qwen2ForInference(cfg, w), Qwen2ForInference(cfg, w, static_shapes=True)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, cfg.vocab_size, (int(n),), generator=g).tolist() for n in (12, 1, 5, 20)]
    ref = generate(dyn, prompts, 24)
    assert generate(static, prompts, 24).tokens == ref.tokens
    for spec in (SpecConfig("chain", gamma=3), SpecConfig("tree", branching=(2, 2, 1)), SpecConfig("dynamic", topk=2, depth=3, budget=6)):
        out = speculative_generate(static, near_target, prompts, 24, spec)
        assert out.tokens == ref.tokens and out.tau > 1.5
    # the same model as target and draft: two live caches never share buffers; a finished one's are reused
    assert speculative_generate(static, static, prompts, 24, SpecConfig("chain", gamma=2)).tokens == ref.tokens
    c = static.new_cache(4, 100)
    k = c.k
    assert c.max_len == 256
    del c
    live = static.new_cache(4, 100)
    assert live.k is k and static.new_cache(4, 100).k is not k
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        Qwen2ForInference(cfg, w, cuda_graphs=True)


def test_linear_packs_only_large_fp32_cpu_weights(monkeypatch):
    from megatron_soaes.inference.model import Linear

    x = torch.randn(1, 5, 512)
    big, small = torch.randn(1024, 512), torch.randn(64, 512)
    lin = Linear(big, torch.randn(1024))
    assert (lin.packed is not None) == bool(Linear._packed_ok)
    assert torch.allclose(lin(x), torch.nn.functional.linear(x, big, lin.bias), atol=1e-4)
    assert Linear(small).packed is None and Linear(big.double()).packed is None
    monkeypatch.setattr(Linear, "_packed_ok", False)  # a torch without oneDNN: plain F.linear
    assert Linear(big).packed is None


def test_spec_config_parse():
    assert SpecConfig.parse(None, gamma=3).branching == (1, 1, 1)
    assert SpecConfig.parse("3,2,1").max_nodes == 1 + 3 + 6 + 6
    d = SpecConfig.parse("dynamic:2,4,8")
    assert (d.mode, d.topk, d.depth, d.budget) == ("dynamic", 2, 4, 8)
    with pytest.raises(ValueError, match="dynamic:TOPK,DEPTH,BUDGET"):
        SpecConfig.parse("dynamic:2,4")
    with pytest.raises(ValueError, match="branching factors"):
        SpecConfig.parse("wide")


def test_perfect_draft_accepts_everything(pair):
    target, _ = pair
    out = speculative_generate(target, target, [[1, 2, 3]], 30, SpecConfig("chain", gamma=4))
    assert out.tau == pytest.approx(5.0) and out.alpha == pytest.approx(1.0)
    assert out.target_forwards == 6


def test_eos_stops_generation(pair):
    target, draft = pair
    ref = generate(target, [[5, 6, 7]], 20)
    eos = ref.tokens[0][6]
    out = speculative_generate(target, draft, [[5, 6, 7]], 20, SpecConfig("tree"), eos_id=eos)
    assert out.tokens[0] == ref.tokens[0][:ref.tokens[0].index(eos) + 1]


def test_kv_cache_rollback_matches_direct_decoding(pair):
    target, _ = pair
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, target.vocab_size, (2, 6), generator=g)
    # a static tree: root, 3 children, 2 grandchildren each
    parents = torch.tensor([-1, 0, 0, 0, 1, 1, 2, 2, 3, 3])
    depth = torch.tensor([0, 1, 1, 1, 2, 2, 2, 2, 2, 2])
    tokens = torch.randint(0, target.vocab_size, (2, 10), generator=g)
    anc = torch.zeros(10, 10, dtype=torch.bool)
    for i in range(10):
        anc[i] = anc[parents[i]] if i else anc[i]
        anc[i, i] = True
    cache = target.new_cache(2, 32)
    target.forward(prefix, torch.arange(6).expand(2, 6), cache)
    cache.lengths += 6
    target.forward(tokens, 6 + depth.expand(2, 10), cache, block_mask=anc.expand(2, 10, 10))
    paths = torch.tensor([[0, 2, 7, -1, -1, -1, -1, -1, -1, -1], [0, 3, -1, -1, -1, -1, -1, -1, -1, -1]])
    cache.commit(paths, torch.tensor([3, 2]))
    for b, n in ((0, 3), (1, 2)):
        seq = torch.cat([prefix[b], tokens[b, paths[b, :n]]])[None]
        direct = target.new_cache(1, 32)
        target.forward(seq, torch.arange(seq.shape[1])[None], direct)
        L = seq.shape[1]
        assert int(cache.lengths[b]) == L
        assert torch.allclose(cache.k[:, b, :, :L], direct.k[:, 0, :, :L], atol=1e-6)
        assert torch.allclose(cache.v[:, b, :, :L], direct.v[:, 0, :, :L], atol=1e-6)


# ---------------- sampling is lossless ----------------

def _chi2_critical(df: int, z: float = 3.29) -> float:
    """Upper 0.0005 quantile of chi-square(df), Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    n = counts.sum()
    exp = probs * n
    keep = exp > 5  # pool rare cells
    stat = ((counts[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    rest_o, rest_e = counts[~keep].sum(), exp[~keep].sum()
    if rest_e > 0:
        stat = stat + (rest_o - rest_e) ** 2 / rest_e
    return float(stat), int(keep.sum()) - (0 if rest_e > 0 else 1)


def _markov_trees(B, V, branching, mode, g):
    """Trees over a Markov target: node probabilities T[token]; draft q badly matched to the target."""
    p_root = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    T = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1)
    Q = torch.softmax(-2.0 * torch.log(T) + torch.randn(V, V, generator=g), -1)  # favours unlikely tokens
    q_root = torch.softmax(-2.0 * torch.log(p_root), -1)
    N = 1
    w = 1
    for k in branching:
        w *= k
        N += w
    parents = torch.full((B, N), -1, dtype=torch.long)
    tokens = torch.zeros(B, N, dtype=torch.long)
    qs = torch.zeros(B, N, V)
    tp = torch.zeros(B, N, V)
    tp[:, 0] = p_root
    lo, hi = 0, 1
    for k in branching:
        nxt = hi
        for node in range(lo, hi):
            qn = q_root.expand(B, V).clone() if node == 0 else Q[tokens[:, node]]
            for _ in range(k):
                if mode == "topk":  # deterministic: next-best not yet taken
                    x = qn.argmax(-1)
                else:
                    x = torch.multinomial(qn, 1, generator=g)[:, 0]
                tokens[:, nxt], qs[:, nxt], parents[:, nxt] = x, qn, node
                tp[:, nxt] = T[x]
                if mode in ("without_replacement", "topk"):
                    qn = qn.scatter(1, x[:, None], 0.0)
                    qn = qn / qn.sum(-1, keepdim=True)
                nxt += 1
        lo, hi = hi, nxt
    return parents, tokens, tp, (None if mode == "topk" else qs), p_root, T


@pytest.mark.parametrize("mode,branching", [("iid", (1, 1, 1)), ("iid", (3, 2)), ("without_replacement", (3, 2)),
                                            ("topk", (3, 2)), ("without_replacement", (6,))])
def test_tree_sampling_is_lossless(mode, branching):
    V, B = 6, 40000
    g = torch.Generator().manual_seed(11)
    parents, tokens, tp, qs, p_root, T = _markov_trees(B, V, branching, mode, g)
    u = torch.rand(B, parents.shape[1], 2, generator=g)
    path, length, nxt = tree_verify(parents, tokens, tp, qs, u)
    ar = torch.arange(B)
    first = torch.where(length > 1, tokens[ar, path[:, 1].clamp(min=0)], nxt)
    counts = torch.bincount(first, minlength=V).double()
    stat, df = _chi2(counts, p_root.double())
    assert stat < _chi2_critical(df), (stat, df)
    # pairs (first, second) where the second is emitted in this round
    two = length > 1
    second = torch.where(length > 2, tokens[ar, path[:, 2].clamp(min=0)], nxt)
    # P(first=x, second=y) = p_root(x) T[x](y); every sample has a second token in this round iff
    # first was a draft, so compare conditionally on each first token.
    for x in range(V):
        sel = two & (first == x)
        if sel.sum() < 2000:
            continue
        c = torch.bincount(second[sel], minlength=V).double()
        stat, df = _chi2(c, T[x].double())
        assert stat < _chi2_critical(df), (x, stat, df)
    # a badly matched draft still gets some tokens accepted, and the bonus token always comes
    assert (length >= 1).all() and (nxt >= 0).all()


def test_speculative_sampling_matches_target_sampling(tmp_path):
    """End to end: the first two emitted tokens from speculative sampling follow the target's distribution."""
    from megatron_soaes.models.random_init import make_random_hf_model

    make_random_hf_model(tmp_path / "t", "test", seed=3, vocab_size=8, make_vocab_size_divisible_by=8)
    make_random_hf_model(tmp_path / "d", "test", seed=4, vocab_size=8, num_layers=1, make_vocab_size_divisible_by=8)
    target, draft = load_inference_model(tmp_path / "t"), load_inference_model(tmp_path / "d")
    assert_first_token_follows_the_target(target, draft)


def assert_first_token_follows_the_target(target, draft, prompt=(1, 2, 3), B: int = 3000) -> None:
    """Speculative sampling (chain and tree) of 3000 rows: the first emitted token's counts against the target's
    distribution at temperature 0.8 (chi-square), on a target of 8 tokens."""
    prompt = list(prompt)
    logits = target.forward(torch.tensor([prompt]), torch.arange(len(prompt))[None], target.new_cache(1, 8))[0, -1]
    p1 = torch.softmax(logits / 0.8, -1).double()
    for spec in (SpecConfig("chain", gamma=3), SpecConfig("tree", branching=(2, 2))):
        out = speculative_generate(target, draft, [prompt] * B, 2, spec, temperature=0.8, seed=5)
        first = torch.tensor([t[0] for t in out.tokens])
        stat, df = _chi2(torch.bincount(first, minlength=8).double(), p1)
        assert stat < _chi2_critical(df), (spec.mode, stat, df)


def test_chi_square_catches_a_lossy_verifier():
    """Negative control: trying siblings against the unchanged target distribution (no residual)
    is not lossless, and the test above would see it."""
    V, B = 6, 40000
    g = torch.Generator().manual_seed(11)
    parents, tokens, tp, qs, p_root, _ = _markov_trees(B, V, (3,), "iid", g)
    u = torch.rand(B, 4, generator=g)
    ar = torch.arange(B)
    first = torch.multinomial(p_root.expand(B, V), 1, generator=g)[:, 0]  # fallback: sample from p
    done = torch.zeros(B, dtype=torch.bool)
    for c in (1, 2, 3):
        x = tokens[:, c]
        acc = ~done & (u[:, c] < (p_root[x] / qs[ar, c, x]).clamp(max=1))
        first = torch.where(acc, x, first)
        done |= acc
    stat, df = _chi2(torch.bincount(first, minlength=V).double(), p_root.double())
    assert stat > _chi2_critical(df)


# ---------------- native op vs the PyTorch oracle ----------------

def _random_trees(B, N, V, g, with_q=True, dup=False):
    parents = torch.zeros(B, N, dtype=torch.long)
    parents[:, 0] = -1
    for i in range(1, N):
        parents[:, i] = torch.randint(0, i, (B,), generator=g)
    hi = 3 if dup else V
    tokens = torch.randint(0, hi, (B, N), generator=g)
    p = torch.softmax(torch.randn(B, N, V, generator=g) * 2, -1)
    p[: B // 4] = torch.nn.functional.one_hot(p[: B // 4].argmax(-1), V).float()  # greedy rows
    q = torch.softmax(torch.randn(B, N, V, generator=g) * 2, -1) if with_q else None
    u = torch.rand(B, N, 2, generator=g)
    return parents, tokens, p, q, u


def _assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x.cpu(), y.cpu())


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_native_op_matches_reference(device):
    if device == "cuda" and not (torch.cuda.is_available() and native_available("cuda")):
        pytest.skip("CUDA op needs a GPU and a CUDA build")
    assert native_available("cpu"), "the C++ op must be built (pip install --no-build-isolation -e .)"
    g = torch.Generator().manual_seed(0)
    cases = [(400, 1, 17, True, False), (400, 2, 5, True, False), (1000, 8, 11, True, False),
             (1000, 16, 50, False, False), (1000, 24, 7, True, True), (500, 24, 7, False, True),
             (200, 64, 300, True, False), (200, 64, 300, False, False)]
    total = 0
    for B, N, V, with_q, dup in cases:
        args = _random_trees(B, N, V, g, with_q, dup)
        ref = tree_verify_reference(*args)
        dev_args = [a.to(device) if a is not None else None for a in args]
        _assert_same(tree_verify(*dev_args, implementation="native"), ref)
        total += B
    # all accepted (draft == argmax chain), all rejected (draft tokens have zero target mass)
    B, N, V = 50, 10, 20
    parents = torch.arange(-1, N - 1).expand(B, N).contiguous()
    p = torch.softmax(torch.randn(B, N, V, generator=g), -1)
    best = p.argmax(-1)
    onehot = torch.nn.functional.one_hot(best, V).float()
    tokens = torch.cat([torch.zeros(B, 1, dtype=torch.long), best[:, :-1]], 1)
    u = torch.rand(B, N, 2, generator=g)
    path, length, nxt = tree_verify(parents.to(device), tokens.to(device), onehot.to(device), None, u.to(device))
    assert (length.cpu() == N).all() and torch.equal(nxt.cpu(), best[:, -1])
    p0 = p.clone()
    p0[torch.arange(B)[:, None], torch.arange(N)[None], tokens.roll(-1, 1)] = 0
    bad = tokens.clone()
    for args in [(parents, bad, p0, None, u), (parents, bad, p0, p, u)]:
        dev_args = [a.to(device) if a is not None else None for a in args]
        out = tree_verify(*dev_args)
        _assert_same(out, tree_verify_reference(*args))
        assert (out[1].cpu() == 1).all()
    assert total >= 4000


def test_native_op_rejects_bad_input():
    assert native_available("cpu")
    p = torch.full((1, 2, 4), 0.25)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tree_verify(torch.tensor([[-1, 0]]), torch.tensor([[0, 9]]), p, None, torch.rand(1, 2, 2), implementation="native")
    with pytest.raises(ValueError, match="uniforms"):
        tree_verify(torch.tensor([[-1, 0]]), torch.tensor([[0, 1]]), p, None, torch.rand(1, 2, 3), implementation="native")
    with pytest.raises(ValueError, match="parents"):
        tree_verify(torch.tensor([[-1, 1]]), torch.tensor([[0, 1]]), p, None, torch.rand(1, 2, 2), implementation="native")
    # the op's own checks (defence in depth, called directly)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        torch.ops.soaes.tree_verify(torch.tensor([[-1, 0]]), torch.tensor([[0, 9]]), p, torch.empty(0), torch.rand(1, 2, 2))


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_tensor_parallel_inference_equals_one_process(hf_models, tmp_path, name):
    """TP=2 on two gloo processes (GQA 8/2, q/k/v and gate/up split by rows, o/down by columns, vocab-split
    LM head) gives exactly the TP=1 tokens: greedy, seeded sampling, chain and tree speculation."""
    from pathlib import Path

    from conftest import read_json, torchrun

    from megatron_soaes.models.random_init import make_random_hf_model

    make_random_hf_model(tmp_path / "draft", "test", seed=9, num_layers=2)
    out = tmp_path / "tp.json"
    torchrun(2, Path(__file__).parent / "workers" / "tp_generate.py", hf_models[name], tmp_path / "draft", out)
    for r in read_json(out):
        assert (r["tp"], r["local_heads"], r["local_kv_heads"], r["cache_heads"]) == (2, 4, 1, 1)
        assert r["logit_diff"] < 1e-5, r
        assert all(r[k] for k in ("greedy", "sampled", "chain", "tree", "chain_sampled", "tree_sampled")), r


def test_tensor_parallel_that_does_not_divide_is_refused_before_loading(hf_models):
    from megatron_soaes.inference.tp import TensorParallel, TensorParallelError

    with pytest.raises(TensorParallelError, match="tensor parallel 3 does not divide num_attention_heads 8"):
        load_inference_model(hf_models["tied"], tp=TensorParallel(size=3, rank=0))



@pytest.mark.parametrize("gamma", [1, 2, 4])
def test_chain_acceptance_is_what_teacher_forced_agreement_predicts(pair, near_target, gamma):
    """Greedy chain speculation accepts exactly the draft's teacher-forced matches on the target's own
    output: the number of target forwards equals `chain_rounds` of those matches, for a near-copy draft
    (accepts often) and a random one (nearly never). A decoder that dropped acceptable tokens (a baseline
    draft accepting nothing although it agrees with the target) fails here."""
    from megatron_soaes.speculative.bench import chain_rounds, draft_agreement

    target, random_draft = pair
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, target.vocab_size, (int(n),), generator=g).tolist() for n in (5, 12, 20)]
    ref = generate(target, prompts, 24).tokens
    for draft in (near_target, random_draft):
        matches = draft_agreement(draft, prompts, ref)
        for p, m in zip(prompts, matches):
            out = speculative_generate(target, draft, [p], 24, SpecConfig("chain", gamma=gamma))
            assert out.target_forwards == chain_rounds(m, gamma)
    assert sum(map(sum, draft_agreement(near_target, prompts, ref))) > 30  # the near copy does agree
