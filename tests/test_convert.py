"""HF <-> megatron torch_dist conversion: bit-exact round trips, megatron interop, bad input."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_soaes.checkpoint.convert import ConversionError, hf_to_megatron, megatron_to_hf
from megatron_soaes.checkpoint.dcp_io import DcpReader


def hf_tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("name", ["tied", "untied", "odd_vocab"])
@pytest.mark.parametrize("tp,pp,dtype", [(1, 1, None), (2, 2, "bf16")])
def test_roundtrip_bit_exact(hf_models, tmp_path, name, tp, pp, dtype):
    src = hf_models[name]
    if dtype:  # bf16 source checkpoint, as released models are
        src16 = tmp_path / "src16"
        shutil.copytree(src, src16)
        t = {k: v.to(torch.bfloat16) for k, v in load_file(src16 / "model.safetensors").items()}
        save_file(t, src16 / "model.safetensors", metadata={"format": "pt"})
        src = src16
    hf_to_megatron(src, tmp_path / "mc", tp, pp, progress=False)
    megatron_to_hf(tmp_path / "mc", tmp_path / "back", progress=False)
    a, b = hf_tensors(src), hf_tensors(tmp_path / "back")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "back" / "config.json").read_text())["vocab_size"] == \
        json.loads((src / "config.json").read_text())["vocab_size"]


def test_chunks_follow_target_tensor_parallel_layout(hf_models, tmp_path):
    hf_to_megatron(hf_models["untied"], tmp_path / "mc", 2, 1, progress=False)
    md = DcpReader(tmp_path / "mc").metadata.state_dict_metadata
    qkv = md["decoder.layers.self_attention.linear_qkv.weight"]
    assert sorted(tuple(c.offsets) for c in qkv.chunks if c.offsets[0] == 0) == [(0, 0, 0), (0, 48, 0)]
    fc1 = md["decoder.layers.mlp.linear_fc1.weight"]  # [gate; up], each half split over TP
    assert sorted(tuple(c.offsets)[1] for c in fc1.chunks if c.offsets[0] == 0) == [0, 80, 160, 240]
    proj = md["decoder.layers.self_attention.linear_proj.weight"]
    assert sorted(tuple(c.offsets) for c in proj.chunks if c.offsets[0] == 1) == [(1, 0, 0), (1, 0, 32)]


def test_sharded_hf_input_and_output(hf_models, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(hf_models["untied"]).save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    hf_to_megatron(tmp_path / "sharded", tmp_path / "mc", progress=False)
    megatron_to_hf(tmp_path / "mc", tmp_path / "back", max_shard_bytes=100_000, progress=False)
    assert (tmp_path / "back" / "model.safetensors.index.json").exists()
    a, b = hf_tensors(hf_models["untied"]), hf_tensors(tmp_path / "back")
    assert all(torch.equal(a[k], b[k]) for k in a) and set(a) == set(b)
    # transformers loads our export
    AutoModelForCausalLM.from_pretrained(tmp_path / "back")


def test_converted_checkpoint_equals_megatron_own_save(hf_models, tmp_path, monkeypatch):
    """Our streamed writer and megatron-core's own dist_checkpointing.save hold the same tensors."""
    from megatron.core import dist_checkpointing

    from megatron_soaes.checkpoint.load import load_model_weights
    from megatron_soaes.checkpoint.meta import write_meta
    from megatron_soaes.models import Qwen2Config, build_model
    from megatron_soaes.runtime import initialize

    initialize()
    src = hf_models["tied"]
    hf_to_megatron(src, tmp_path / "ours", progress=False)
    cfg = Qwen2Config.from_hf(src)
    model = build_model(cfg)
    load_model_weights(model, tmp_path / "ours")
    (tmp_path / "theirs").mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path / "theirs"))
    write_meta(tmp_path / "theirs", cfg)
    ours, theirs = DcpReader(tmp_path / "ours"), DcpReader(tmp_path / "theirs")
    assert set(ours.keys()) == set(theirs.keys())
    for k in ours.keys():
        assert torch.equal(ours.read(k), theirs.read(k)), k
    with pytest.raises(ConversionError, match="no manifest.json"):  # megatron-core writes none: refused ...
        megatron_to_hf(tmp_path / "theirs", tmp_path / "back", progress=False)
    monkeypatch.setenv("SOAES_ALLOW_UNVERIFIED", "1")  # ... unless the user says --allow-unverified
    megatron_to_hf(tmp_path / "theirs", tmp_path / "back", progress=False)
    a, b = hf_tensors(src), hf_tensors(tmp_path / "back")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- bad input: a one-line error naming what is wrong, and nothing written ----

def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(d, fn):
    t = load_file(d / "model.safetensors")
    fn(t)
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})


BAD_CASES = {
    "missing": (lambda d: _edit_tensors(d, lambda t: t.pop("model.layers.2.self_attn.k_proj.bias")),
                {}, "missing tensor model.layers.2.self_attn.k_proj.bias"),
    "extra": (lambda d: _edit_tensors(d, lambda t: t.__setitem__("model.layers.9.mlp.up_proj.weight", torch.zeros(2))),
              {}, "unexpected tensor model.layers.9.mlp.up_proj.weight"),
    "shape": (lambda d: _edit_tensors(d, lambda t: t.__setitem__("model.layers.1.mlp.down_proj.weight", torch.zeros(64, 159))),
              {}, r"tensor model.layers.1.mlp.down_proj.weight has shape \[64, 159\], expected \[64, 160\]"),
    "tp": (lambda d: None, {"tensor_parallel": 3}, "tensor parallel size 3 does not divide num_attention_heads 8"),
    "pp": (lambda d: None, {"pipeline_parallel": 3}, "pipeline parallel size 3 does not divide num_layers 4"),
    "arch": (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
             "architectures": ["MistralForCausalLM"], "model_type": "mistral"})),
             {}, "unknown architecture"),
    "corrupt": (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage"),
                {}, "model.safetensors: corrupt or unreadable safetensors file"),
    "truncated": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
                  {}, "model.safetensors: corrupt or unreadable safetensors file"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_fails_cleanly(hf_models, tmp_path, case):
    mutate, kwargs, msg = BAD_CASES[case]
    src = _copy(hf_models["untied"], tmp_path / "src")
    mutate(src)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=msg) as e:
        hf_to_megatron(src, out, progress=False, **kwargs)
    assert "\n" not in str(e.value)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary left behind


def test_cli_reports_one_line_and_exit_code_2(hf_models, tmp_path):
    res = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "hf-to-megatron", str(hf_models["untied"]),
                          str(tmp_path / "o"), "--tp", "3"], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: tensor parallel size 3")
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(hf_models, tmp_path):
    hf_to_megatron(hf_models["tied"], tmp_path / "mc", progress=False)
    with pytest.raises(FileExistsError):
        hf_to_megatron(hf_models["tied"], tmp_path / "mc", progress=False)
    hf_to_megatron(hf_models["tied"], tmp_path / "mc", overwrite=True, progress=False)


def test_megatron_to_hf_rejects_non_checkpoint(tmp_path):
    with pytest.raises(ConversionError, match="not a megatron checkpoint"):
        megatron_to_hf(tmp_path, tmp_path / "out")
