import json

import pytest

from megatron_soaes.models import ModelConfigError, Qwen2Config, preset

# Parameter counts on the Qwen2.5 model cards (embedding counted once when tied).
PUBLISHED = {"qwen2.5-0.5b": 0.49e9, "qwen2.5-1.5b": 1.54e9, "qwen2.5-7b": 7.61e9, "qwen2.5-72b": 72.7e9}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_presets_match_published_parameter_counts(name):
    assert preset(name).num_parameters() == pytest.approx(PUBLISHED[name], rel=0.01)


def test_hf_config_roundtrip():
    cfg = preset("qwen2.5-7b")
    again = Qwen2Config.from_hf(cfg.to_hf())
    assert again.to_hf() == cfg.to_hf()
    assert again.padded_vocab_size == 151936 and again.head_dim == 128


def test_from_hf_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(preset("test").to_hf()))
    assert Qwen2Config.from_hf(tmp_path).num_key_value_heads == 2


@pytest.mark.parametrize("mutate,msg", [
    (lambda c: c.update(architectures=["MixtralForCausalLM"], model_type="mixtral"), "unknown architecture"),  # Llama is supported now
    (lambda c: c.pop("hidden_size"), "missing field 'hidden_size'"),
    (lambda c: c.update(num_key_value_heads=3), "not divisible by num_key_value_heads 3"),
    (lambda c: c.update(rope_scaling={"type": "yarn", "factor": 4}), "rope_scaling"),
])
def test_from_hf_errors(mutate, msg):
    c = preset("test").to_hf()
    mutate(c)
    with pytest.raises(ModelConfigError, match=msg):
        Qwen2Config.from_hf(c)


def test_bad_json_names_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="config.json: invalid JSON"):
        Qwen2Config.from_hf(tmp_path)


@pytest.mark.parametrize("tp,pp,msg", [
    (3, 1, "tensor parallel size 3 does not divide num_attention_heads 8"),
    (4, 1, "tensor parallel size 4 does not divide num_key_value_heads \\(query groups\\) 2"),
    (1, 3, "pipeline parallel size 3 does not divide num_layers 4"),
])
def test_check_parallel(tp, pp, msg):
    with pytest.raises(ModelConfigError, match=msg):
        preset("test").check_parallel(tp, pp)


def test_vocab_padding():
    assert preset("test", vocab_size=1000).padded_vocab_size == 1024
    assert preset("qwen2.5-72b").padded_vocab_size == 151936


def test_unknown_preset():
    with pytest.raises(ModelConfigError, match="unknown model preset"):
        preset("gpt-5")


def test_build_model_is_megatron_gptmodel_with_qwen2_features():
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel

    from megatron_soaes.models import build_model
    from megatron_soaes.runtime import initialize

    initialize()
    m = build_model(preset("test", tie_word_embeddings=True))
    assert isinstance(m, GPTModel)
    c = m.config
    assert c.num_query_groups == 2 and c.add_qkv_bias and not c.add_bias_linear
    assert c.gated_linear_unit and c.activation_func is F.silu and c.normalization == "RMSNorm"
    assert m.share_embeddings_and_output_weights
    assert m.rotary_pos_emb.inv_freq[1].item() == pytest.approx(1e6 ** (-2 / 8))
    names = dict(m.named_parameters())
    assert names["decoder.layers.0.self_attention.linear_qkv.bias"].shape == (8 * 8 + 2 * 2 * 8,)
