"""Megatron-Bridge checkpoints in and out: start CPT/SFT here from a Bridge run, hand a model trained here to
Bridge or to NeMo Export-Deploy.

The format, as Megatron-Bridge 0.3.1 writes and reads it (``training/checkpointing.py``,
``training/utils/checkpoint_utils.py``, ``training/model_load_save.py``; its package imports Transformer Engine,
so it is read from source, not run)::

    <root>/latest_checkpointed_iteration.txt   the newest iteration (Megatron-LM's tracker file)
    <root>/latest_train_state.pt               that iteration's TrainState (tensors: step, consumed samples, ...)
    <root>/iter_0000100/                       a megatron-core torch_dist checkpoint (.metadata, *.distcp, common.pt,
        run_config.yaml                        metadata.json): the model's tensors under megatron's sharded keys as
        train_state.pt                         TE layers save them, plus optimizer / RNG state if training saved them;
        tokenizer/                             run_config.yaml's ``model`` is the model provider (TransformerConfig
                                               fields) with ``hf_model_id``, which Bridge's and NeMo Export-Deploy's
                                               discovery (``get_hf_model_id_from_checkpoint``) reads

Only the model's weights cross over (optimizer state starts fresh). Tensors are copied stored chunk by stored
chunk, so memory is one chunk whatever the model's size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from megatron_soaes.checkpoint import qwen2_hf, te_layout
from megatron_soaes.checkpoint.dcp_io import DcpReader, DcpWriter
from megatron_soaes.checkpoint.meta import META_FILE, atomic_directory, read_meta, write_meta
from megatron_soaes.models.config import ModelConfigError, Qwen2Config
from megatron_soaes.utils.dtypes import HF_NAMES, dtype_name

TRACKER = "latest_checkpointed_iteration.txt"
RUN_CONFIG = "run_config.yaml"
TRAIN_STATE = "train_state.pt"
HF_CONFIG_DIR = "hf_config"  # config.json + tokenizer written beside the iterations: the default hf_model_id
PROVIDER = "megatron.bridge.models.gpt_provider.GPTModelProvider"  # what AutoBridge builds for these families

# (our Qwen2Config field, the provider's TransformerConfig field): Bridge's own HF <-> provider mapping
# (model_bridge.CONFIG_MAPPING) composed with transformers' names for ours
FIELDS = (("num_layers", "num_layers"), ("hidden_size", "hidden_size"), ("intermediate_size", "ffn_hidden_size"),
          ("num_attention_heads", "num_attention_heads"), ("num_key_value_heads", "num_query_groups"),
          ("head_dim", "kv_channels"), ("vocab_size", "vocab_size"), ("max_position_embeddings", "seq_length"),
          ("rms_norm_eps", "layernorm_epsilon"), ("init_method_std", "init_method_std"),
          ("rope_theta", "rotary_base"), ("tie_word_embeddings", "share_embeddings_and_output_weights"),
          ("attention_bias", "add_qkv_bias"), ("qk_norm", "qk_layernorm"),
          ("make_vocab_size_divisible_by", "make_vocab_size_divisible_by"))
MOE_FIELDS = (("num_experts", "num_moe_experts"), ("num_experts_per_tok", "moe_router_topk"),
              ("moe_intermediate_size", "moe_ffn_hidden_size"))


class BridgeFormatError(ValueError):
    """A directory that is not a Megatron-Bridge checkpoint this project can read; the message says why."""


def _call(target: str) -> dict:
    """How Bridge's YAML names a function or dtype it must not call (utils/yaml_utils.py)."""
    return {"_target_": target, "_call_": False}


def iteration_dir(path) -> Path:
    """The iteration directory of a Bridge checkpoint given its root (the tracker's iteration, else the newest
    ``iter_*``) or an iteration directory itself."""
    p = Path(path)
    if (p / ".metadata").exists():
        return p
    tracker = p / TRACKER
    if tracker.exists():
        text = tracker.read_text().strip()
        it = p / ("release" if text == "release" else f"iter_{int(text):07d}")
        if not it.is_dir():
            raise BridgeFormatError(f"{tracker}: names iteration {text}, but {it.name}/ is missing")
        return it
    iters = sorted((d for d in p.glob("iter_*") if d.name[5:].isdigit()), key=lambda d: int(d.name[5:]))
    if not iters:
        raise BridgeFormatError(f"{p}: not a Megatron-Bridge checkpoint (no {TRACKER}, iter_* or .metadata)")
    return iters[-1]


def is_bridge_checkpoint(path) -> bool:
    """A Megatron-Bridge checkpoint (its root or an iteration directory)."""
    try:
        return (iteration_dir(path) / RUN_CONFIG).exists()
    except (BridgeFormatError, ValueError):
        return False


def provider_section(cfg: Qwen2Config, hf_model_id: str, dtype: torch.dtype = torch.bfloat16) -> dict:
    """run_config.yaml's ``model``: the GPTModelProvider AutoBridge would build for `cfg` (its provider_bridge
    settings for Qwen2 / Qwen3 / Qwen3-MoE / Llama) with parameters in `dtype`, and `hf_model_id`."""
    if cfg.rope_scaling:
        raise ModelConfigError(f"{cfg.architecture} with rope_scaling: Megatron-Bridge keeps Llama 3's RoPE scaling "
                               "in its own Llama provider classes, which this export does not write")
    out = {"_target_": PROVIDER, **{theirs: getattr(cfg, ours) for ours, theirs in FIELDS},
           "normalization": "RMSNorm", "gated_linear_unit": True, "activation_func": _call("torch.nn.functional.silu"),
           "position_embedding_type": "rope", "rotary_percent": 1.0, "add_bias_linear": False,
           "hidden_dropout": 0.0, "attention_dropout": 0.0, "bf16": dtype == torch.bfloat16,
           "fp16": dtype == torch.float16, "params_dtype": _call(str(dtype)), "autocast_dtype": _call(str(dtype)),
           "hf_model_id": hf_model_id}
    if cfg.is_moe:
        out.update({theirs: getattr(cfg, ours) for ours, theirs in MOE_FIELDS})
        # a list, not 1: megatron then keys every layer by its index, as this project saves MoE models
        out.update(moe_layer_freq=[int(s) for s in cfg.moe_layers()], moe_router_pre_softmax=not cfg.norm_topk_prob,
                   moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=cfg.router_aux_loss_coef,
                   moe_grouped_gemm=True, moe_token_dispatcher_type="alltoall")
    return out


def config_from_provider(model: dict, where) -> Qwen2Config:
    """Our model config from run_config.yaml's ``model`` section (a provider AutoBridge built for Qwen2, Qwen3,
    Qwen3-MoE or Llama)."""
    missing = [theirs for _, theirs in FIELDS[:7] if model.get(theirs) is None]
    if missing:
        raise BridgeFormatError(f"{where}: model.{missing[0]} is missing")
    act = model.get("activation_func")
    act = act.get("_target_") if isinstance(act, dict) else act
    if model.get("normalization", "RMSNorm") != "RMSNorm" or not model.get("gated_linear_unit", True) or \
            (act and not str(act).endswith("silu")):
        raise BridgeFormatError(f"{where}: not a SwiGLU / RMSNorm decoder (normalization "
                                f"{model.get('normalization')}, activation {act}); Qwen2/Qwen3/Llama only")
    kw = {ours: model[theirs] for ours, theirs in FIELDS if model.get(theirs) is not None}
    if model.get("num_moe_experts"):
        kw.update({ours: model[theirs] for ours, theirs in MOE_FIELDS})
        freq = model.get("moe_layer_freq", 1)
        sparse = freq if isinstance(freq, list) else [(i % int(freq)) == 0 for i in range(kw["num_layers"])]
        kw.update(architecture="Qwen3MoeForCausalLM", mlp_only_layers=[i for i, s in enumerate(sparse) if not s],
                  norm_topk_prob=not model.get("moe_router_pre_softmax", False))
    else:
        kw["architecture"] = ("Qwen3ForCausalLM" if kw.get("qk_norm") else
                              "Qwen2ForCausalLM" if kw.get("attention_bias") else "LlamaForCausalLM")
    try:
        return Qwen2Config(**kw)
    except (ModelConfigError, TypeError) as e:
        raise BridgeFormatError(f"{where}: {e}") from None


def read_run_config(it: Path) -> dict:
    path = it / RUN_CONFIG
    if not path.exists():
        raise BridgeFormatError(f"{it}: no {RUN_CONFIG}; not a Megatron-Bridge checkpoint")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise BridgeFormatError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise BridgeFormatError(f"{path}: no `model` section")
    return data


def bridge_model_config(path, hf_config=None) -> Qwen2Config:
    """The model config of a Bridge checkpoint: ours if we wrote it, else from run_config.yaml's provider,
    checked against the HF config it names (`hf_config` or model.hf_model_id, where that is a local directory)."""
    it = iteration_dir(path)
    if (it / META_FILE).exists():
        return Qwen2Config(**read_meta(it)["model"])
    model = read_run_config(it)["model"]
    cfg = config_from_provider(model, it / RUN_CONFIG)
    hf = Path(hf_config) if hf_config else Path(str(model.get("hf_model_id") or "-"))
    if (hf / "config.json").exists():
        from_hf = Qwen2Config.from_hf(hf)
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
            if getattr(from_hf, name) != getattr(cfg, name):
                raise BridgeFormatError(f"{it / RUN_CONFIG}: model has {name} {getattr(cfg, name)}, its HF config "
                                        f"{hf} has {getattr(from_hf, name)}")
        return from_hf  # it also knows what the provider does not say (RoPE scaling, token ids)
    return cfg


def _source_chunks(reader: DcpReader, key: str, cfg: Qwen2Config):
    """(offsets, chunk) of our tensor `key`: stored under its name (or the other spec's), or, for an MoE model,
    inside megatron's layer-stacked tensor (what a Bridge run with ``moe_layer_freq: 1`` saves)."""
    if key in reader:
        yield from reader.chunks(key)
        return
    layer, _, rest = key[len(qwen2_hf.L):].partition(".")
    stacked = qwen2_hf.L + rest
    if not (cfg.is_moe and layer.isdigit() and stacked in reader):
        raise BridgeFormatError(f"{reader.dir}: checkpoint has no tensor {key}")
    for offsets, chunk in reader.chunks(stacked):
        if offsets[0] == int(layer):
            yield offsets[1:], chunk[0]
        elif offsets[0] < int(layer) < offsets[0] + chunk.shape[0]:
            yield offsets[1:], chunk[int(layer) - offsets[0]]


def _copy_weights(reader: DcpReader, writer: DcpWriter, cfg: Qwen2Config, name, progress: bool, desc: str) -> dict:
    """Copy the model's tensors chunk by chunk, each under `name(our key)`; returns {written key: shape}."""
    shapes = {}
    tensors = qwen2_hf.megatron_tensors(cfg)
    keys = {t.key for t in tensors}
    for t in tqdm(tensors, desc=desc, disable=not progress, unit="tensor"):
        want = t.global_shape(cfg.num_layers)
        out_key = name(t.key, keys)
        chunks = iter(_source_chunks(reader, t.key, cfg))
        first = next(chunks, None)
        if first is None:
            raise BridgeFormatError(f"{reader.dir}: tensor {t.key} has no data")
        writer.declare(out_key, want, first[1].dtype)
        for offsets, chunk in [first, *chunks]:
            if len(offsets) != len(want):
                raise BridgeFormatError(f"{reader.dir}: tensor {t.key} is stored with {len(offsets)} dims, "
                                        f"expected shape {list(want)}")
            writer.write(out_key, offsets, chunk)
        shapes[out_key] = want
    return shapes


def megatron_to_bridge(src, out_dir, hf_model_id: str | None = None, overwrite: bool = False,
                       progress: bool = True) -> Path:
    """Write checkpoint `src` (ours) as a Megatron-Bridge checkpoint root at `out_dir`: TE-spec tensor names and
    extra-state objects (Bridge builds TE layers), run_config.yaml, tracker and train state, the tokenizer, and
    `hf_config/` (config.json, tokenizer) that model.hf_model_id points at unless `hf_model_id` names another."""
    from megatron_soaes.checkpoint.load import resolve_checkpoint
    from megatron_soaes.checkpoint.manifest import verify, write_manifest

    src = resolve_checkpoint(src)
    verify(src)
    meta = read_meta(src)
    cfg = Qwen2Config(**meta["model"])
    iteration = int(src.name[5:]) if src.name.startswith("iter_") and src.name[5:].isdigit() else 0
    reader = DcpReader(src)
    dtype = reader.dtype("decoder.final_layernorm.weight")
    out_dir = Path(out_dir)
    provider_section(cfg, "-")  # refuse what Bridge's provider cannot say before writing anything
    with atomic_directory(out_dir, overwrite) as tmp:
        it = tmp / f"iter_{iteration:07d}"
        writer = DcpWriter(it)
        shapes = _copy_weights(reader, writer, cfg, te_layout.te_name, progress, "Megatron -> Bridge")
        for key in te_layout.extra_state_keys(shapes):
            writer.write_object(key, te_layout.empty_extra_state())
        writer.close(common={"checkpoint_version": 3.0, "iteration": iteration})
        hf_dir = tmp / HF_CONFIG_DIR
        hf_dir.mkdir()
        (hf_dir / "config.json").write_text(json.dumps(cfg.to_hf(HF_NAMES[dtype]), indent=2))
        from megatron_soaes.checkpoint.convert import _copy_tokenizer

        if (src / "tokenizer").is_dir():
            _copy_tokenizer(src / "tokenizer", hf_dir)
            _copy_tokenizer(src / "tokenizer", it / "tokenizer")
        model_id = hf_model_id or str((out_dir / HF_CONFIG_DIR).resolve())
        run_config = {
            "model": provider_section(cfg, model_id, dtype),
            "tokenizer": {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": model_id},
            "checkpoint": {"save": str(out_dir.resolve()), "ckpt_format": "torch_dist", "save_optim": False,
                           "save_rng": False},
        }
        (it / RUN_CONFIG).write_text(yaml.safe_dump(run_config, sort_keys=False))
        state = {"step": torch.tensor(iteration, dtype=torch.int32),
                 "consumed_train_samples": torch.tensor(0, dtype=torch.int32),
                 "skipped_train_samples": torch.tensor(0, dtype=torch.int32),
                 "consumed_valid_samples": torch.tensor(0, dtype=torch.int32),
                 "floating_point_operations_so_far": torch.tensor(0.0, dtype=torch.float64),
                 "do_train": torch.tensor(False), "do_valid": torch.tensor(False), "do_test": torch.tensor(False)}
        torch.save(state, it / TRAIN_STATE)
        torch.save(state, tmp / f"latest_{TRAIN_STATE}")
        (tmp / TRACKER).write_text(str(iteration))
        write_meta(it, cfg, dtype=dtype_name(dtype), source=str(src), layer_spec="transformer_engine")
        write_manifest(it)  # `soaes verify-checkpoint` checks it, and our loaders read it as they read ours
    return out_dir


def bridge_to_megatron(src, out_dir, hf_config=None, overwrite: bool = False, progress: bool = True) -> Path:
    """Convert a Megatron-Bridge checkpoint (root or iteration directory; TE or local layer names, layer-stacked
    or per-layer MoE keys) into one of ours at `out_dir`: the model's weights, its config, its tokenizer (the
    checkpoint's `tokenizer/`, else the HF directory it names), a manifest."""
    from megatron_soaes.checkpoint.convert import TOKENIZER_FILES, _copy_tokenizer
    from megatron_soaes.checkpoint.manifest import write_manifest

    it = iteration_dir(src)
    cfg = bridge_model_config(it, hf_config)
    reader = DcpReader(it)
    with atomic_directory(out_dir, overwrite) as tmp:
        writer = DcpWriter(tmp)
        _copy_weights(reader, writer, cfg, lambda key, keys: key, progress, "Bridge -> Megatron")
        writer.close()
        write_meta(tmp, cfg, dtype=dtype_name(reader.dtype("decoder.final_layernorm.weight")), source=str(it))
        model_id = Path(str(hf_config or read_run_config(it)["model"].get("hf_model_id") or "-"))
        for tok in (it / "tokenizer", it.parent / HF_CONFIG_DIR, model_id):
            if tok.is_dir() and any((tok / f).exists() for f in TOKENIZER_FILES):
                _copy_tokenizer(tok, tmp / "tokenizer")
                break
        write_manifest(tmp)
    return Path(out_dir)
