"""Checkpoints across layer specs and with Megatron-Bridge.

The TE side is megatron-core's own TE layer spec built with stand-in modules (tests/te_standin.py: TE's
parameter names and extra state, local arithmetic), saved by megatron-core's own `dist_checkpointing.save`; the
Bridge side is the format read from Megatron-Bridge 0.3.1's source (its package needs TE to import)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from te_standin import build_te_model

from megatron_soaes.checkpoint import bridge, te_layout
from megatron_soaes.checkpoint.convert import hf_to_megatron
from megatron_soaes.checkpoint.dcp_io import DcpReader


def _objects(d) -> set:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    return {k for k, v in DcpReader(d).metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}


def _logits(model, cfg):
    from megatron_soaes.models.forward import forward_logits

    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    return forward_logits(model, tokens)


def _same_tensors(a, b, rename=lambda k: k):
    ra, rb = DcpReader(a), DcpReader(b)
    assert {rename(k) for k in ra.keys()} == set(rb.keys())
    for k in ra.keys():
        assert torch.equal(ra.read(k), rb.read(rename(k))), k


@pytest.fixture(params=["test", "test-qwen3", "test-moe"])
def converted(request, tmp_path):
    """A random HF model of a dense family (Qwen2: q/k/v bias; Qwen3: q/k norms) or MoE (Qwen3-MoE, one dense layer), converted."""
    from megatron_soaes.models import Qwen2Config
    from megatron_soaes.models.random_init import make_random_hf_model

    make_random_hf_model(tmp_path / "hf", request.param, seed=2)
    hf_to_megatron(tmp_path / "hf", tmp_path / "ours", progress=False)
    return Qwen2Config.from_hf(tmp_path / "hf"), tmp_path / "ours"


def test_te_and_local_layers_read_each_others_checkpoints(converted, tmp_path, monkeypatch):
    """A checkpoint saved by TE layers loads into local layers and the reverse, with equal logits; our TE-layout
    writer (megatron-to-bridge) writes exactly the tensors and extra-state objects megatron-core saves for TE layers,
    and megatron-core's own loader (no key matching of ours) fills a TE model from it."""
    from megatron.core import dist_checkpointing

    from megatron_soaes.checkpoint.load import load_model_weights
    from megatron_soaes.models import build_model
    from megatron_soaes.runtime import initialize

    cfg, ours = converted
    initialize()
    local = build_model(cfg)
    load_model_weights(local, ours)
    want = _logits(local, cfg)
    te = build_te_model(cfg)
    load_model_weights(te, ours)  # local-layout checkpoint -> TE layers
    assert torch.equal(_logits(te, cfg), want)
    (tmp_path / "te").mkdir()
    dist_checkpointing.save(te.sharded_state_dict(), str(tmp_path / "te"))  # what a TE run writes
    if cfg.is_moe:  # the one tensor the specs name differently
        assert any(k.endswith(te_layout.TE_SPARSE_NORM) for k in DcpReader(tmp_path / "te").keys())
    monkeypatch.setenv("SOAES_ALLOW_UNVERIFIED", "1")  # megatron-core writes no manifest
    local2 = build_model(cfg)
    load_model_weights(local2, tmp_path / "te")  # TE-layout checkpoint -> local layers
    assert torch.equal(_logits(local2, cfg), want)

    out = bridge.megatron_to_bridge(ours, tmp_path / "bridge", progress=False)
    it = bridge.iteration_dir(out)
    _same_tensors(tmp_path / "te", it)  # bit-exact, under TE's names
    assert _objects(it) == _objects(tmp_path / "te")  # every extra state a TE model asks for, and no other
    te2 = build_te_model(cfg)
    request = te2.sharded_state_dict()
    state = dist_checkpointing.load(request, str(it))
    te2.load_state_dict({k: v for k, v in state.items() if k in request}, strict=True)
    assert torch.equal(_logits(te2, cfg), want)

    back = bridge.bridge_to_megatron(out, tmp_path / "back", progress=False)
    _same_tensors(ours, back)  # TE layout -> local layout bit-exact


def test_megatron_core_saved_bridge_checkpoint_converts(tmp_path, monkeypatch):
    """A checkpoint as a Bridge training run leaves it -- megatron-core's save of TE layers, every layer of a
    Qwen3-MoE sparse so megatron stacks the layers (moe_layer_freq 1), run_config.yaml naming a hub model id that
    is not here, no file of ours -- converts to the weights the HF source converts to."""
    from megatron.core import dist_checkpointing

    from megatron_soaes.checkpoint.load import load_model_weights
    from megatron_soaes.models import Qwen2Config
    from megatron_soaes.models.random_init import make_random_hf_model
    from megatron_soaes.runtime import initialize

    make_random_hf_model(tmp_path / "hf", "test-moe", seed=4, mlp_only_layers=[])
    hf_to_megatron(tmp_path / "hf", tmp_path / "ours", progress=False)
    cfg = Qwen2Config.from_hf(tmp_path / "hf")
    initialize()
    per_layer = build_te_model(cfg)
    load_model_weights(per_layer, tmp_path / "ours")
    te = build_te_model(cfg, moe_layer_freq=1)  # the same modules; only megatron's checkpoint keys differ
    te.load_state_dict(per_layer.state_dict())
    it = tmp_path / "run" / "iter_0000050"
    it.mkdir(parents=True)
    dist_checkpointing.save(te.sharded_state_dict(), str(it))
    assert "decoder.layers.pre_mlp_layernorm.weight" in DcpReader(it).keys()  # layer-stacked
    model = bridge.provider_section(cfg, "Qwen/Qwen3-30B-A3B")
    model["moe_layer_freq"] = 1
    (it / bridge.RUN_CONFIG).write_text(yaml.safe_dump({"model": model}))
    (tmp_path / "run" / bridge.TRACKER).write_text("50")
    assert bridge.is_bridge_checkpoint(tmp_path / "run")
    assert bridge.bridge_model_config(tmp_path / "run").to_dict() == {**cfg.to_dict(), "extra_hf": {}}
    back = bridge.bridge_to_megatron(tmp_path / "run", tmp_path / "back", progress=False)
    _same_tensors(tmp_path / "ours", back)


def test_cpt_from_a_bridge_checkpoint_starts_where_the_hf_source_does(cpt_data, tmp_path, monkeypatch):
    """`soaes convert bridge-to-megatron` on a Bridge checkpoint of a Qwen2 model (megatron-core's TE-layer save,
    config from run_config.yaml alone) gives a CPT run the first-step loss of the same model converted from HF."""
    from conftest import ROOT, job_env
    from megatron.core import dist_checkpointing
    from test_cpt import losses, write_config

    from megatron_soaes.checkpoint.load import load_model_weights
    from megatron_soaes.config import load_config
    from megatron_soaes.models import Qwen2Config
    from megatron_soaes.models.random_init import make_random_hf_model
    from megatron_soaes.runtime import initialize
    from megatron_soaes.training import train
    from megatron_soaes.training.cpt import CPTTask

    make_random_hf_model(tmp_path / "hf", "test", vocab_size=4096, seed=6)
    hf_to_megatron(tmp_path / "hf", tmp_path / "from_hf", progress=False)
    cfg = Qwen2Config.from_hf(tmp_path / "hf")
    initialize()
    te = build_te_model(cfg)
    load_model_weights(te, tmp_path / "from_hf")
    it = tmp_path / "bridge" / "iter_0000000"
    it.mkdir(parents=True)
    dist_checkpointing.save(te.sharded_state_dict(), str(it))
    (it / bridge.RUN_CONFIG).write_text(yaml.safe_dump({"model": bridge.provider_section(cfg, "org/not-here")}))
    res = subprocess.run([sys.executable, "-m", "megatron_soaes.cli", "convert", "bridge-to-megatron",
                          str(tmp_path / "bridge"), str(tmp_path / "from_bridge")],
                         env=job_env(), cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    firsts = []
    for init in ("from_hf", "from_bridge"):
        run = tmp_path / f"run_{init}"
        cfg_path = write_config(cpt_data, run, steps=4, save_interval=0)
        train(load_config(cfg_path, [f"model.init_checkpoint={tmp_path / init}"]), CPTTask(), log=lambda s: None)
        firsts.append(losses(run)[1])
    assert firsts[0] == firsts[1]


def _bridge_checkpoint_utils():
    """Megatron-Bridge 0.3.1's own `training/utils/checkpoint_utils.py` (requirements/interop.txt), imported
    beneath the package inits that need Transformer Engine; its TrainState import (unused here) stubbed."""
    import importlib
    import importlib.util
    import types
    from pathlib import Path

    root = Path(list(importlib.util.find_spec("megatron.bridge").submodule_search_locations)[0])
    saved = {k: v for k, v in sys.modules.items() if k.startswith("megatron.bridge")}
    try:
        for name, path in (("", root), (".training", root / "training"), (".training.utils", root / "training" / "utils"),
                           (".utils", root / "utils"), (".training.state", None)):
            m = types.ModuleType("megatron.bridge" + name)
            if path is None:
                m.TrainState = object
            else:
                m.__path__ = [str(path)]
            sys.modules[m.__name__] = m
        return importlib.import_module("megatron.bridge.training.utils.checkpoint_utils")
    finally:
        for k in [k for k in sys.modules if k.startswith("megatron.bridge")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_bridge_reads_our_export_with_its_own_code(converted, tmp_path):
    """Bridge's checkpoint discovery (what NeMo Export-Deploy's megatron_bridge path calls first) finds the HF
    model id we record, from the root and from the iteration; its tracker and train-state checks pass; its
    run-config reader gives back the provider we wrote."""
    cu = _bridge_checkpoint_utils()
    cfg, ours = converted
    out = bridge.megatron_to_bridge(ours, tmp_path / "b", progress=False)
    it = bridge.iteration_dir(out)
    want = str((out / bridge.HF_CONFIG_DIR).resolve())
    assert cu.get_hf_model_id_from_checkpoint(out) == want == cu.get_hf_model_id_from_checkpoint(it)
    assert cu.checkpoint_exists(str(out))
    assert (out / bridge.TRACKER).read_text() == "0" and it.name == cu.get_checkpoint_name(str(out), 0)[len(str(out)) + 1:]
    state = torch.load(cu.get_checkpoint_train_state_filename(str(out), prefix=cu.TRACKER_PREFIX), weights_only=True)
    assert int(state["step"]) == 0
    model = cu.read_run_config(str(it / bridge.RUN_CONFIG))["model"]
    assert bridge.config_from_provider(model, it).to_dict() == {**cfg.to_dict(), "extra_hf": {}}
    from transformers import AutoConfig  # what Export-Deploy then loads from that id

    assert AutoConfig.from_pretrained(want).num_hidden_layers == cfg.num_layers


@pytest.mark.parametrize("case,match", [
    ("empty", "not a Megatron-Bridge checkpoint"),
    ("bad_tracker", "names iteration 7, but iter_0000007/ is missing"),
    ("no_model", "no `model` section"),
    ("not_swiglu", "not a SwiGLU / RMSNorm decoder"),
])
def test_bad_bridge_input_is_one_line(tmp_path, case, match):
    d = tmp_path / "b"
    it = d / "iter_0000001"
    it.mkdir(parents=True)
    (it / ".metadata").write_bytes(b"")
    model = bridge.provider_section(__import__("megatron_soaes.models", fromlist=["preset"]).preset("test"), "x")
    if case == "empty":
        d = tmp_path / "nothing"
        d.mkdir()
    elif case == "bad_tracker":
        (d / bridge.TRACKER).write_text("7")
    elif case == "no_model":
        (it / bridge.RUN_CONFIG).write_text("checkpoint: {}\n")
    else:
        model["activation_func"] = {"_target_": "torch.nn.functional.gelu", "_call_": False}
        (it / bridge.RUN_CONFIG).write_text(yaml.safe_dump({"model": model}))
    with pytest.raises(bridge.BridgeFormatError, match=match):
        bridge.bridge_to_megatron(d, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
