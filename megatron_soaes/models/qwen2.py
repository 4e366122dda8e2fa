"""Qwen2 / Qwen2.5 on megatron-core's GPTModel.

The architecture is fully described by `Qwen2Config` (the HF ``config.json`` fields that matter);
`build_model` turns it into a GPTModel at the current parallel layout. GQA, bias on QKV only,
RMSNorm, SwiGLU, RoPE (base 1e6) and tied/untied embeddings are all megatron-core features;
nothing here re-implements a layer.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)


class ModelConfigError(ValueError):
    """A model config that cannot describe a Qwen2 model, or one that cannot be split as asked."""


@dataclass
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    # Megatron pads the embedding so every TP size it may be resharded to divides it.
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    extra_hf: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ModelConfigError(
                    f"hidden_size {self.hidden_size} not divisible by num_attention_heads {self.num_attention_heads}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_attention_heads", "num_key_value_heads"):
            if int(getattr(self, name)) < 1:
                raise ModelConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"num_attention_heads {self.num_attention_heads} not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}"
            )

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return int(math.ceil(self.vocab_size / m) * m)

    def num_parameters(self) -> int:
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        layer = 2 * h + h * (q + 2 * kv) + (q + 2 * kv) + q * h + 3 * h * f
        emb = self.padded_vocab_size * h
        return self.num_layers * layer + h + emb * (1 if self.tie_word_embeddings else 2)

    def check_parallel(self, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> None:
        """Raise a one-line error if this model cannot be split at TP/PP."""
        checks = [
            (self.num_attention_heads, "num_attention_heads", tensor_parallel, "tensor parallel size"),
            (self.num_key_value_heads, "num_key_value_heads (query groups)", tensor_parallel, "tensor parallel size"),
            (self.intermediate_size, "intermediate_size", tensor_parallel, "tensor parallel size"),
            (self.padded_vocab_size, "padded vocab size", tensor_parallel, "tensor parallel size"),
            (self.num_layers, "num_layers", pipeline_parallel, "pipeline parallel size"),
        ]
        for value, what, size, kind in checks:
            if size < 1 or value % size:
                raise ModelConfigError(f"{kind} {size} does not divide {what} {value}")

    # ---- HF config.json ----
    @classmethod
    def from_hf(cls, hf: dict | str | Path) -> "Qwen2Config":
        source = "config"
        if not isinstance(hf, dict):
            path = Path(hf)
            if path.is_dir():
                path = path / "config.json"
            source = str(path)
            try:
                hf = json.loads(path.read_text())
            except FileNotFoundError:
                raise ModelConfigError(f"{path}: no such file") from None
            except json.JSONDecodeError as e:
                raise ModelConfigError(f"{path}: invalid JSON ({e})") from None
        archs = hf.get("architectures") or []
        if hf.get("model_type") not in ("qwen2", None) or (archs and archs[0] not in SUPPORTED_ARCHITECTURES):
            raise ModelConfigError(
                f"{source}: unknown architecture {archs or hf.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if hf.get("rope_scaling"):
            raise ModelConfigError(f"{source}: rope_scaling {hf['rope_scaling']!r} is not supported")
        rope_theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 1e6))
        try:
            return cls(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_layers=hf["num_hidden_layers"],
                num_attention_heads=hf["num_attention_heads"],
                num_key_value_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
                max_position_embeddings=hf.get("max_position_embeddings", 32768),
                rope_theta=float(rope_theta),
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                head_dim=hf.get("head_dim"),
                extra_hf={k: hf[k] for k in ("bos_token_id", "eos_token_id", "torch_dtype") if k in hf},
            )
        except KeyError as e:
            raise ModelConfigError(f"{source}: missing field {e.args[0]!r}") from None

    def to_hf(self, torch_dtype: str = "bfloat16") -> dict:
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_layers,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "sliding_window": None,
            "attention_dropout": 0.0,
            "initializer_range": self.init_method_std,
            "use_cache": True,
            "bos_token_id": self.extra_hf.get("bos_token_id", 151643 if self.vocab_size > 151643 else None),
            "eos_token_id": self.extra_hf.get("eos_token_id", 151643 if self.vocab_size > 151643 else None),
            "torch_dtype": torch_dtype,
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Published Qwen2.5 shapes (config.json of the HF releases); `tiny*` are for tests and the demo.
PRESETS: dict[str, dict] = {
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=151936, hidden_size=3584, intermediate_size=18944, num_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "qwen2.5-72b": dict(vocab_size=151936, hidden_size=8192, intermediate_size=29568, num_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
    # tiny target / draft pair and a test-sized model (GQA ratio 2 and 4).
    "tiny": dict(vocab_size=8000, hidden_size=256, intermediate_size=704, num_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048),
    # the CPU speculative-decoding target: big enough that a tiny-draft forward costs a fraction of its own
    "small": dict(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048),
    "tiny-draft": dict(vocab_size=8000, hidden_size=128, intermediate_size=352, num_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
    "test": dict(vocab_size=1024, hidden_size=64, intermediate_size=160, num_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512),
}


def preset(name: str, **overrides) -> Qwen2Config:
    if name not in PRESETS:
        raise ModelConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return Qwen2Config(**{**PRESETS[name], **overrides})


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def layer_spec(use_te: bool | None = None):
    """TE fused layer spec when Transformer Engine is importable, megatron's local spec otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te is None:
        use_te = have_transformer_engine()
    if use_te:
        if not have_transformer_engine():
            raise RuntimeError("use_te=True but transformer_engine is not installed (pip install '.[gpu]')")
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_config(cfg: Qwen2Config, dtype: str = "fp32", **overrides):
    """megatron-core TransformerConfig for this Qwen2 model at the current parallel layout."""
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    if dtype not in _DTYPES:
        raise ModelConfigError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cfg.check_parallel(tp, pp)
    torch_dtype = _DTYPES[dtype]
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        add_bias_linear=False,
        add_qkv_bias=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        params_dtype=torch_dtype,
        pipeline_dtype=torch_dtype,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        use_cpu_initialization=not torch.cuda.is_available(),
        # Fused kernels are CUDA-only; megatron falls back to the torch path without them.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_model(cfg: Qwen2Config, dtype: str = "fp32", use_te: bool | None = None, vp_stage=None, **overrides):
    """GPTModel for this rank's pipeline stage. Call after `runtime.initialize`."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    tcfg = transformer_config(cfg, dtype, **overrides)
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=layer_spec(use_te),
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta),
        rotary_percent=1.0,
        vp_stage=vp_stage,
    )
    # Without TE/apex, megatron's local spec falls back to torch.nn norms created in fp32. A bf16/fp16
    # model must hold every parameter in that dtype: megatron's mixed-precision optimizer maps its
    # state to the model by assuming so (a mixed model saves optimizer state under the wrong names).
    half = tcfg.params_dtype
    if half != torch.float32:
        for p in model.parameters():
            if p.dtype == torch.float32:
                p.data = p.data.to(half)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
