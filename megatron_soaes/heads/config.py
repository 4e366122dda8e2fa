"""What a draft head is, derived from its target: one record, kept in the head's checkpoint meta."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from megatron_soaes.config.job import HEAD_KINDS
from megatron_soaes.models.config import Qwen2Config


def default_feature_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's (and vLLM's) low / middle / high choice: the inputs of layers 2, L // 2 and L - 3."""
    if num_layers < 6:  # small models: three distinct layers, the first and the last included
        return (0, num_layers // 2, num_layers - 1)
    return (2, num_layers // 2, num_layers - 3)


TITLES = {"eagle3": "EAGLE-3 head", "mtp": "MTP head"}  # as reports and logs name each kind


@dataclass
class HeadConfig:
    """A draft head for `target`: one layer with the target's shapes, and an output layer over
    `draft_vocab_size` tokens (the whole vocabulary when equal to it). `kind` eagle3: `fc` fuses the inputs of
    three `feature_layers` (target layer indices: the hidden state entering that layer); mtp (megatron-core's
    multi-token-prediction layer): it reads the target's final hidden state after its norm, feature layer
    `num_layers` in this numbering."""

    target: dict  # the target's Qwen2Config as a dict
    feature_layers: tuple[int, ...] = ()
    draft_vocab_size: int = 0
    kind: str = "eagle3"
    ttt_steps: int = 3  # training-time test: steps the head is fed its own outputs for (a record; decoding ignores it)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        cfg = self.target_config
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"draft head kind {self.kind!r}: one of {', '.join(HEAD_KINDS)}")
        self.draft_vocab_size = self.draft_vocab_size or cfg.vocab_size
        if self.kind == "mtp":
            if tuple(self.feature_layers) not in ((), (cfg.num_layers,)):
                raise ValueError(f"draft head feature_layers {list(self.feature_layers)}: an mtp head reads the target's "
                                 "final hidden state only; leave feature_layers unset")
            self.feature_layers = (cfg.num_layers,)
        else:
            self.feature_layers = tuple(self.feature_layers) or default_feature_layers(cfg.num_layers)
            bad = [i for i in self.feature_layers if not 0 <= i < cfg.num_layers]
            if bad or len(self.feature_layers) != 3 or len(set(self.feature_layers)) != 3:
                raise ValueError(f"draft head feature_layers {list(self.feature_layers)}: three distinct layer indices "
                                 f"in [0, {cfg.num_layers}) are needed")
        if not 1 <= self.draft_vocab_size <= cfg.vocab_size:
            raise ValueError(f"draft_vocab_size {self.draft_vocab_size} must be in [1, {cfg.vocab_size}]")

    @property
    def target_config(self) -> Qwen2Config:
        return Qwen2Config(**self.target)

    def layer_config(self) -> Qwen2Config:
        """The head's own layer as a one-layer model of the target's shapes (no QKV bias, no QK norm: the
        head's layer is a Llama layer whatever the target, as EAGLE-3's is)."""
        t = dict(self.target, num_layers=1, architecture="LlamaForCausalLM", attention_bias=False, qk_norm=False,
                 num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0, mlp_only_layers=[],
                 tie_word_embeddings=False)
        return Qwen2Config(**t)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["feature_layers"] = list(self.feature_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        return cls(**d)
