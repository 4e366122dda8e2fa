"""SDPA core attention (`models.attention.SDPAttention`) against megatron-core's DotProductAttention:
causal, block-causal (packed rows) and GQA, fp32 to 1e-5; whole-model logits the same with either;
the attention choice is validated before any work."""

import pytest
import torch


@pytest.fixture(scope="module")
def megatron_state():
    from megatron_soaes.runtime import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=0)


def _pair(kv_heads: int):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_soaes.models import preset, transformer_config
    from megatron_soaes.models.attention import SDPAttention

    cfg = transformer_config(preset("test", num_key_value_heads=kv_heads))
    return [cls(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
            for cls in (DotProductAttention, SDPAttention)]


@pytest.mark.parametrize("kv_heads", [8, 2], ids=["mha", "gqa4"])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "block-causal"])
def test_sdpa_equals_megatron_dot_product_attention(megatron_state, kv_heads, masked):
    from megatron_soaes.sft.task import block_causal_mask

    ref, sdpa = _pair(kv_heads)
    g = torch.Generator().manual_seed(kv_heads + masked)
    s, b, heads, hn = 48, 3, 8, 8
    q = torch.randn(s, b, heads, hn, generator=g)
    k, v = (torch.randn(s, b, kv_heads, hn, generator=g) for _ in range(2))
    mask = None
    if masked:  # three packed examples per row and padding (segment 0), as SFT rows have
        seg = torch.tensor([[1] * 10 + [2] * 20 + [3] * 12 + [0] * 6, [1] * 48, [1] * 5 + [2] * 40 + [0] * 3])
        mask = block_causal_mask(seg)
    a, c = ref(q, k, v, mask), sdpa(q, k, v, mask)
    assert a.shape == c.shape == (s, b, heads * hn)
    assert (a - c).abs().max() < 1e-5
    if masked:  # and it is not just causal: example 2 of row 0 does not see example 1
        assert (c - sdpa(q, k, v, None)).abs()[10:42, 0].max() > 1e-3


def test_model_logits_same_with_sdpa_and_megatron_attention(megatron_state, hf_models, tmp_path):
    from megatron_soaes.checkpoint.convert import hf_to_megatron
    from megatron_soaes.checkpoint.load import load_model_weights
    from megatron_soaes.checkpoint.meta import read_model_config
    from megatron_soaes.models import build_model
    from megatron_soaes.models.attention import SDPAttention

    ck = hf_to_megatron(hf_models["untied"], tmp_path / "mc", progress=False)
    cfg = read_model_config(ck)
    toks = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(40).expand(2, 40)
    logits = {}
    for attention in ("megatron_local", "sdpa"):
        m = build_model(cfg, attention=attention)
        load_model_weights(m, ck)
        m.eval()
        uses_sdpa = isinstance(m.decoder.layers[0].self_attention.core_attention, SDPAttention)
        assert uses_sdpa == (attention == "sdpa")
        with torch.no_grad():
            logits[attention] = m(toks, pos, None)
    assert (logits["sdpa"] - logits["megatron_local"]).abs().max() < 1e-5


def test_attention_choice_is_checked_before_work():
    from types import SimpleNamespace

    from megatron_soaes.config import ConfigError
    from megatron_soaes.models.megatron import select_attention

    job = lambda a, cp=1: SimpleNamespace(train=SimpleNamespace(attention=a),  # noqa: E731
                                          parallel=SimpleNamespace(context_parallel=cp))
    assert select_attention(job("auto"), use_te=False) == "sdpa"
    assert select_attention(job("megatron_local"), use_te=False) == "megatron_local"
    assert select_attention(job("auto"), use_te=True) == "transformer_engine"
    with pytest.raises(ConfigError, match="train.attention: transformer_engine needs Transformer Engine layers"):
        select_attention(job("transformer_engine"), use_te=False)
    with pytest.raises(ConfigError, match="set train.transformer_impl: local"):
        select_attention(job("sdpa"), use_te=True)
    assert select_attention(job("auto", cp=2), use_te=False) == "sdpa"  # context parallelism in the SDPA layers
    with pytest.raises(ConfigError, match="megatron's unfused local attention cannot split a sequence"):
        select_attention(job("megatron_local", cp=2), use_te=False)


def _sft_job(attention="auto", **sft):
    from megatron_soaes.config import parse_config

    return parse_config({"kind": "sft", "model": {"preset": "test"}, "data": {"tokenizer": "t.json", "seq_length": 64},
                         "train": {"steps": 1, "global_batch_size": 4, "micro_batch_size": 2, "output_dir": "/tmp/o",
                                   "attention": attention},
                         "sft": {"train": [{"path": "a.jsonl"}], **sft}}, "test job")


def test_packed_attention_choice_is_checked_before_work():
    """auto: dense mask on CPU (FlexAttention has no CPU backward), flex on CUDA without TE; flex needs
    SDPA layers and a GPU, thd needs TE on a GPU -- ConfigErrors naming the field."""
    from megatron_soaes.config import ConfigError
    from megatron_soaes.sft.task import select_packed_attention

    assert select_packed_attention(_sft_job()) == "dense_mask"
    with pytest.raises(ConfigError, match="sft.packed_attention: flex trains on a GPU only"):
        select_packed_attention(_sft_job(packed_attention="flex"))
    with pytest.raises(ConfigError, match="sft.packed_attention: flex runs in the SDPA core attention"):
        select_packed_attention(_sft_job("megatron_local", packed_attention="flex"))
    with pytest.raises(ConfigError, match="sft.packed_attention: thd needs Transformer Engine layers on a GPU"):
        select_packed_attention(_sft_job(packed_attention="thd"))


def test_fusions_follow_the_device(megatron_state):
    """CPU: every fusion off. CUDA without TE: the jit_fuser ones and the native CE fusion on, the
    TE/apex kernels (RoPE, gradient accumulation) off; RoPE fusion with TE, gradient-accumulation fusion
    only with apex's kernel. The config builds either way."""
    from megatron_soaes.models import preset, transformer_config
    from megatron_soaes.models.megatron import FUSION_FLAGS, fusions

    cpu = transformer_config(preset("test"))
    assert not any(getattr(cpu, k) is True for k in FUSION_FLAGS)
    gpu = fusions(use_te=False, cuda=True)
    assert gpu["bias_activation_fusion"] and gpu["bias_dropout_fusion"] and gpu["cross_entropy_loss_fusion"]
    assert gpu["cross_entropy_fusion_impl"] == "native" and not gpu["apply_rope_fusion"] and not gpu["gradient_accumulation_fusion"]
    te = fusions(use_te=True, cuda=True)  # TE's CE kernel only where megatron imported it; no apex: no grad-acc fusion
    assert te["apply_rope_fusion"] and te["cross_entropy_fusion_impl"] == "native" and not te["gradient_accumulation_fusion"]
    cfg = transformer_config(preset("test"), **gpu)
    assert cfg.bias_activation_fusion and cfg.cross_entropy_loss_fusion
