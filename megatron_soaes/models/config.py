"""The model description: `Qwen2Config` (the HF ``config.json`` fields that matter), the published
presets, and the vocabulary padding rule. The megatron model (`models.megatron`), the inference
model (`inference.model`) and the checkpoint converters all build from this one description.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


# architecture -> (model_type, family defaults): Qwen2/2.5 have a bias on q/k/v; Qwen3 (dense) has none
# and an RMSNorm over each query and key head (megatron-core's qk_layernorm) with an explicit head_dim.
# Qwen3-MoE: Qwen3's attention, and mixture-of-experts MLPs (a softmax router over `num_experts`, top-k, no
# shared expert) in the layers that `decoder_sparse_step` / `mlp_only_layers` make sparse.
FAMILIES = {"Qwen2ForCausalLM": ("qwen2", dict(attention_bias=True, qk_norm=False)),
            "Qwen3ForCausalLM": ("qwen3", dict(attention_bias=False, qk_norm=True)),
            "Qwen3MoeForCausalLM": ("qwen3_moe", dict(attention_bias=False, qk_norm=True)),
            "LlamaForCausalLM": ("llama", dict(attention_bias=False, qk_norm=False))}
MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM",)
VOCAB_FAMILY = {"qwen3_moe": "qwen3"}  # model types that share another's tokenizer and chat format (draft pairing)
# MoE variants this project does not implement: a one-line error naming the field, never a silent wrong model
UNSUPPORTED_MOE_FIELDS = ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts",
                          "moe_shared_expert_intermediate_size", "first_k_dense_replace", "n_group", "topk_group",
                          "scoring_func", "routed_scaling_factor")
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
YARN_ROPE_KEYS = ("factor", "original_max_position_embeddings")
YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0}  # as transformers and Qwen's configs use them
_ROPE_META = {"rope_type", "type", "rope_theta"}  # transformers 5 keeps these in rope_parameters


def _check_rope_scaling(r: dict) -> dict:
    """The scalings applied exactly (Llama 3's, YaRN as Qwen documents it); anything else a one-line error."""
    kind = r.get("rope_type", r.get("type"))
    if kind == "llama3":
        required, optional = LLAMA3_ROPE_KEYS, {}
    elif kind == "yarn":
        required, optional = YARN_ROPE_KEYS, YARN_DEFAULTS
    else:
        raise ModelConfigError(f"rope_scaling {r!r}: supported rope types are llama3 and yarn")
    missing = [k for k in required if k not in r]
    if missing:
        raise ModelConfigError(f"rope_scaling {kind} needs {missing}")
    unknown = sorted(set(r) - set(required) - set(optional) - _ROPE_META)
    if unknown:  # mscale / attention_factor / truncate variants: not what Qwen ships, not matched exactly here
        raise ModelConfigError(f"rope_scaling {kind}: keys {unknown} are not supported")
    return {"rope_type": kind, **{k: r[k] for k in required}, **{k: r.get(k) or v for k, v in optional.items()}}


class ModelConfigError(ValueError):
    """A model config that cannot describe a Qwen2 model, or one that cannot be split as asked."""


VOCAB_MULTIPLE = 128  # embedding rows are a multiple of this (every TP size a checkpoint may be resharded to)


def pad_vocab(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """The embedding size for `n` tokens: the next multiple of `multiple` (the one padding rule)."""
    return int(math.ceil(n / multiple) * multiple)


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
    make_vocab_size_divisible_by: int = VOCAB_MULTIPLE
    init_method_std: float = 0.02
    architecture: str = "Qwen2ForCausalLM"  # the HF class; picks the family defaults below
    attention_bias: bool | None = None  # bias on q/k/v (default: the family's)
    qk_norm: bool | None = None  # RMSNorm on each q and k head before RoPE (default: the family's)
    # {"rope_type": "llama3", factor, low/high_freq_factor, original_max_position_embeddings} (Llama 3.1+) or
    # {"rope_type": "yarn", factor, original_max_position_embeddings[, beta_fast, beta_slow]} (Qwen long context)
    rope_scaling: dict | None = None
    # Mixture of experts (Qwen3MoeForCausalLM; 0 experts = dense). intermediate_size is the dense layers'.
    num_experts: int = 0
    num_experts_per_tok: int = 0  # top-k experts per token
    moe_intermediate_size: int = 0  # each expert's SwiGLU width
    norm_topk_prob: bool = True  # renormalise the top-k router weights to sum 1 (else: the softmax over all experts)
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % step == 0 and i is not in mlp_only_layers
    mlp_only_layers: list = field(default_factory=list)
    router_aux_loss_coef: float = 0.001  # the load-balancing loss weight (HF's; training adds it to the loss)
    # the router z-loss weight (ST-MoE: squared log-sum-exp of the router logits, keeps them small); 0 = off,
    # as Qwen3-MoE trains. Like the aux loss, applied to the mean over the MoE layers
    router_z_loss_coef: float = 0.0
    extra_hf: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.architecture not in FAMILIES:
            raise ModelConfigError(f"unknown architecture {self.architecture!r}; supported: {', '.join(FAMILIES)}")
        for k, v in FAMILIES[self.architecture][1].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.rope_scaling is not None:
            self.rope_scaling = _check_rope_scaling(self.rope_scaling)
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
        self.mlp_only_layers = sorted(int(i) for i in self.mlp_only_layers)
        if self.is_moe:
            if self.num_experts < 2 or not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ModelConfigError(f"num_experts {self.num_experts} / num_experts_per_tok {self.num_experts_per_tok}: "
                                       "an MoE model needs at least 2 experts and 1 <= top-k <= num_experts")
            if self.moe_intermediate_size < 1 or self.decoder_sparse_step < 1:
                raise ModelConfigError("moe_intermediate_size and decoder_sparse_step must be positive")
            if self.num_experts_per_tok == 1 and self.norm_topk_prob:  # weight 1 for the one expert
                raise ModelConfigError("num_experts_per_tok 1 with norm_topk_prob: megatron-core's top-1 router only "
                                       "weights by the softmax probability (norm_topk_prob: false)")
            if not any(self.moe_layers()):
                raise ModelConfigError("decoder_sparse_step / mlp_only_layers leave no MoE layer")
        elif self.num_experts:
            raise ModelConfigError(f"num_experts {self.num_experts} given for {self.architecture}, which is dense "
                                   f"(MoE architectures: {', '.join(MOE_ARCHITECTURES)})")

    @property
    def is_moe(self) -> bool:
        return self.architecture in MOE_ARCHITECTURES

    def moe_layers(self) -> list[bool]:
        """Per layer: a mixture-of-experts MLP (True) or a dense one (HF Qwen3-MoE's rule)."""
        if not self.is_moe:
            return [False] * self.num_layers
        return [i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0 for i in range(self.num_layers)]

    @property
    def family(self) -> str:
        """The HF model_type: qwen2, qwen3 or llama."""
        return FAMILIES[self.architecture][0]

    @property
    def padded_vocab_size(self) -> int:
        return pad_vocab(self.vocab_size, self.make_vocab_size_divisible_by)

    def num_parameters(self, active: bool = False, padded: bool = True) -> int:
        """Parameters (embedding rows padded unless `padded=False`); `active`: those one token runs through
        (top-k experts of each MoE layer, not all of them)."""
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = 2 * h + h * (q + 2 * kv) + (q + 2 * kv) * self.attention_bias + q * h + 2 * d * self.qk_norm
        experts = self.num_experts_per_tok if active else self.num_experts
        mlp = sum(self.num_experts * h + experts * 3 * h * self.moe_intermediate_size if sparse else 3 * h * f
                  for sparse in self.moe_layers())
        emb = (self.padded_vocab_size if padded else self.vocab_size) * h
        return self.num_layers * attn + mlp + h + emb * (1 if self.tie_word_embeddings else 2)

    def check_parallel(self, tensor_parallel: int = 1, pipeline_parallel: int = 1, expert_parallel: int = 1,
                       expert_tensor_parallel: int | None = None) -> None:
        """Raise a one-line error if this model cannot be split at TP/PP/EP (and expert TP, default TP)."""
        etp = tensor_parallel if expert_tensor_parallel is None else expert_tensor_parallel
        if expert_parallel > 1 and not self.is_moe:
            raise ModelConfigError(f"expert parallel size {expert_parallel} given for a dense model ({self.architecture})")
        checks = [
            (self.num_attention_heads, "num_attention_heads", tensor_parallel, "tensor parallel size"),
            (self.num_key_value_heads, "num_key_value_heads (query groups)", tensor_parallel, "tensor parallel size"),
            (self.intermediate_size, "intermediate_size", tensor_parallel, "tensor parallel size"),
            (self.padded_vocab_size, "padded vocab size", tensor_parallel, "tensor parallel size"),
            (self.num_layers, "num_layers", pipeline_parallel, "pipeline parallel size"),
            *([(self.num_experts, "num_experts", expert_parallel, "expert parallel size"),
               (self.moe_intermediate_size, "moe_intermediate_size", etp, "expert tensor parallel size")]
              if self.is_moe else []),
        ]
        for value, what, size, kind in checks:
            if size < 1 or value % size:
                raise ModelConfigError(f"{kind} {size} does not divide {what} {value}")
        if self.is_moe:  # megatron-core's MoE reductions run on every stage: a stage without an MoE layer hangs them
            per, sparse = self.num_layers // pipeline_parallel, self.moe_layers()
            empty = [s for s in range(pipeline_parallel) if not any(sparse[s * per:(s + 1) * per])]
            if empty:
                raise ModelConfigError(f"pipeline parallel size {pipeline_parallel} gives stage {empty[0]} no MoE layer "
                                       f"(layers {empty[0] * per}-{(empty[0] + 1) * per - 1} are all dense)")

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
        by_type = {t: a for a, (t, _) in FAMILIES.items()}
        arch = archs[0] if archs else by_type.get(hf.get("model_type", "qwen2"))
        if arch not in FAMILIES or hf.get("model_type", FAMILIES[arch][0]) != FAMILIES[arch][0]:
            raise ModelConfigError(
                f"{source}: unknown architecture {archs or hf.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        # released checkpoints write rope_scaling; transformers 5 writes rope_parameters (with rope_theta in it)
        params = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
        rope_theta = hf.get("rope_theta") or params.get("rope_theta", 1e6)
        moe = {}
        if arch in MOE_ARCHITECTURES:
            bad = [k for k in UNSUPPORTED_MOE_FIELDS if hf.get(k)]
            if bad:
                raise ModelConfigError(f"{source}: {bad[0]}={hf[bad[0]]!r}: this MoE variant (shared experts / grouped "
                                       "or scaled routing) is not supported; Qwen3-MoE routing only")
            # transformers 5 writes num_local_experts (its attribute map's name), the releases num_experts
            moe = dict(num_experts=hf.get("num_experts", hf.get("num_local_experts")), num_experts_per_tok=hf.get("num_experts_per_tok"),
                       moe_intermediate_size=hf.get("moe_intermediate_size"),
                       norm_topk_prob=bool(hf.get("norm_topk_prob", False)),  # transformers' default
                       decoder_sparse_step=hf.get("decoder_sparse_step", 1), mlp_only_layers=hf.get("mlp_only_layers") or [],
                       router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
                       router_z_loss_coef=hf.get("router_z_loss_coef", 0.0))
            missing = [k for k, v in moe.items() if v is None]
            if missing:
                raise ModelConfigError(f"{source}: missing field {missing[0]!r}")
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
                architecture=arch,
                attention_bias=hf.get("attention_bias", FAMILIES[arch][1]["attention_bias"]),
                rope_scaling=scaling,
                **moe,
                extra_hf={k: hf[k] for k in ("bos_token_id", "eos_token_id", "torch_dtype") if k in hf},
            )
        except KeyError as e:
            raise ModelConfigError(f"{source}: missing field {e.args[0]!r}") from None
        except ModelConfigError as e:
            raise ModelConfigError(f"{source}: {e}") from None

    def to_hf(self, torch_dtype: str = "bfloat16") -> dict:
        return {
            "architectures": [self.architecture],
            "model_type": FAMILIES[self.architecture][0],
            **({"attention_bias": self.attention_bias} if self.architecture != "Qwen2ForCausalLM" else {}),
            **({"mlp_bias": False} if self.architecture == "LlamaForCausalLM" else {}),
            **({"rope_scaling": dict(self.rope_scaling)} if self.rope_scaling else {}),
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
            **({"num_experts": self.num_experts, "num_experts_per_tok": self.num_experts_per_tok,
                "moe_intermediate_size": self.moe_intermediate_size, "norm_topk_prob": self.norm_topk_prob,
                "decoder_sparse_step": self.decoder_sparse_step, "mlp_only_layers": list(self.mlp_only_layers),
                "router_aux_loss_coef": self.router_aux_loss_coef, "output_router_logits": False,
                **({"router_z_loss_coef": self.router_z_loss_coef} if self.router_z_loss_coef else {})}
               if self.is_moe else {}),
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def rope_inv_freq(self, device=None) -> "torch.Tensor":
        """RoPE inverse frequencies (fp32), with Llama 3's frequency-dependent scaling when configured
        (as transformers computes them): the megatron model and the inference model both use these."""
        import torch

        d = self.head_dim
        pos_freqs = self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / d)
        inv = 1.0 / pos_freqs
        if not self.rope_scaling:
            return inv
        r = self.rope_scaling
        if r["rope_type"] == "yarn":  # transformers' _compute_yarn_parameters (truncate=True), op for op
            factor, old = r["factor"], r["original_max_position_embeddings"]

            def dim_for(rotations):
                return d * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(self.rope_theta))

            lo = max(math.floor(dim_for(r["beta_fast"])), 0)
            hi = min(math.ceil(dim_for(r["beta_slow"])), d - 1)
            hi = hi + 0.001 if lo == hi else hi
            extrapolation = 1 - ((torch.arange(d // 2, dtype=torch.float32, device=device) - lo) / (hi - lo)).clamp(0, 1)
            return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + inv * extrapolation
        factor, low, high, old = (r[k] for k in LLAMA3_ROPE_KEYS)
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) * ~(wavelen > old / low)
        return torch.where(medium, smoothed, scaled)

    def rope_attention_factor(self) -> float:
        """YaRN scales cos and sin (so q.k) by 0.1 ln(factor) + 1; 1 otherwise."""
        r = self.rope_scaling
        if r and r["rope_type"] == "yarn" and r["factor"] > 1:
            return 0.1 * math.log(r["factor"]) + 1.0
        return 1.0


def _qwen3(hidden, inter, layers, heads, tied, **kw) -> dict:
    return {**dict(vocab_size=151936, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                   num_attention_heads=heads, num_key_value_heads=8, head_dim=128, tie_word_embeddings=tied,
                   max_position_embeddings=40960, architecture="Qwen3ForCausalLM"), **kw}


def _llama3_family(factor: float = 8.0, original: int = 8192) -> dict:
    """What every Llama 3.x release fixes whatever its shape: RoPE base and scaling, norm epsilon."""
    return dict(architecture="LlamaForCausalLM", rope_theta=500000.0, rms_norm_eps=1e-5,
                rope_scaling=dict(rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=original))


def _llama3(hidden, inter, layers, heads, head_dim, factor, tied, original=8192, **kw) -> dict:
    return dict(dict(vocab_size=128256, num_key_value_heads=8, max_position_embeddings=131072), hidden_size=hidden,
                intermediate_size=inter, num_layers=layers, num_attention_heads=heads, head_dim=head_dim,
                tie_word_embeddings=tied, **_llama3_family(factor, original), **kw)


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
    # Qwen3 dense (model cards): hidden, intermediate, layers, heads, tied embeddings
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, tied=True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, tied=True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, tied=True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, tied=False),
    "qwen3-14b": _qwen3(5120, 17408, 40, 40, tied=False),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, tied=False),
    # Llama 3.1 (RoPE factor 8) and 3.2 (factor 32): hidden, intermediate, layers, heads, head_dim
    "llama3.1-8b": _llama3(4096, 14336, 32, 32, 128, factor=8.0, tied=False),
    "llama3.1-70b": _llama3(8192, 28672, 80, 64, 128, factor=8.0, tied=False),
    "llama3.2-1b": _llama3(2048, 8192, 16, 32, 64, factor=32.0, tied=True),
    "llama3.2-3b": _llama3(3072, 8192, 28, 24, 128, factor=32.0, tied=True),
    # test shapes per family: Qwen3 with head_dim != hidden / heads; Llama with a short original context
    "test-qwen3": dict(vocab_size=1024, hidden_size=64, intermediate_size=160, num_layers=4, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=16, max_position_embeddings=512, architecture="Qwen3ForCausalLM"),
    "test-llama3": _llama3(64, 160, 4, 8, 8, factor=8.0, tied=False, vocab_size=1024, num_key_value_heads=2,
                           max_position_embeddings=512, original=64),
    # Qwen3-MoE (config.json of the releases): 48 / 94 layers, 128 experts, top-8, every layer sparse
    "qwen3-30b-a3b": _qwen3(2048, 6144, 48, 32, tied=False, num_experts=128, num_experts_per_tok=8,
                            moe_intermediate_size=768, norm_topk_prob=True, num_key_value_heads=4,
                            architecture="Qwen3MoeForCausalLM"),
    "qwen3-235b-a22b": _qwen3(4096, 12288, 94, 64, tied=False, num_experts=128, num_experts_per_tok=8,
                              moe_intermediate_size=1536, norm_topk_prob=True, num_key_value_heads=4,
                              architecture="Qwen3MoeForCausalLM"),
    # MoE test shapes: 4 experts top-2 with a dense layer among the sparse ones; the pipeline's tiny MoE target
    "test-moe": dict(vocab_size=1024, hidden_size=64, intermediate_size=160, num_layers=4, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=16, max_position_embeddings=512, architecture="Qwen3MoeForCausalLM",
                     num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, mlp_only_layers=[1]),
    "tiny-moe": dict(vocab_size=8000, hidden_size=256, intermediate_size=704, num_layers=4, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=32, max_position_embeddings=2048, architecture="Qwen3MoeForCausalLM",
                     num_experts=8, num_experts_per_tok=2, moe_intermediate_size=352),  # 2 x 352 = tiny's 704 per token
}


# Any preset's shape in another family: its architecture, plus what the family's releases fix (Llama 3.1's
# RoPE base, scaling and norm epsilon). The pipeline's `model.family` applies one of these.
FAMILY_OVERRIDES: dict[str, dict] = {
    "qwen2": dict(architecture="Qwen2ForCausalLM"),
    "qwen3": dict(architecture="Qwen3ForCausalLM"),
    "qwen3_moe": dict(architecture="Qwen3MoeForCausalLM", num_experts=8, num_experts_per_tok=2),  # + moe width
    "llama3": _llama3_family(),  # Llama 3.1's
}


def family_overrides(family: str, preset_name: str, role: str = "target") -> dict:
    """What a pipeline model of `family` changes in its preset. An MoE family's experts are the preset's MLP
    width / top-k each (the dense preset's compute per token); its draft is the dense model of its vocabulary."""
    if role == "draft":
        family = VOCAB_FAMILY.get(family, family)
    out = dict(FAMILY_OVERRIDES[family])
    if "num_experts" in out:
        out["moe_intermediate_size"] = PRESETS[preset_name]["intermediate_size"] // out["num_experts_per_tok"]
    return out


def check_same_family(target: Qwen2Config, other: Qwen2Config, what: str = "draft") -> None:
    """A draft (or the student distilled into one) and its target must be one family: the vocabulary,
    special tokens and chat format come with it, and engines pair drafts with targets per family."""
    if VOCAB_FAMILY.get(other.family, other.family) != VOCAB_FAMILY.get(target.family, target.family):
        raise ModelConfigError(f"{what} is a {other.family} model ({other.architecture}) but the target is "
                               f"{target.family} ({target.architecture}): draft and target must be one family")


def preset(name: str, **overrides) -> Qwen2Config:
    if name not in PRESETS:
        raise ModelConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return Qwen2Config(**{**PRESETS[name], **overrides})


def resolve_model_config(spec, tokenizer=None, where: str = "model") -> Qwen2Config:
    """Qwen2Config from a config section with `preset` + `overrides` or `hf_config` (student or
    teacher), checked against the tokenizer's vocabulary."""
    from megatron_soaes.config import ConfigError

    try:
        cfg = preset(spec.preset, **spec.overrides) if spec.preset else Qwen2Config.from_hf(spec.hf_config)
    except (ModelConfigError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None
    if tokenizer is not None and cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"{where}: vocab_size {cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    return cfg
