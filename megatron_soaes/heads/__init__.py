"""Draft heads: small modules that read the target's own hidden states and draft its next tokens.

EAGLE-3 (Li et al., 2025): one decoder layer fed with the token embedding and a linear fusion of the
target's low, middle and high layer inputs, trained against the target's distribution with its own
outputs fed back for a few steps ("training-time test"), over a reduced draft vocabulary (`vocab`).
The head trains in megatron-core beside the frozen target (`task`), decodes with the speculative
decoder (`inference`), and exports in the layout vLLM and SGLang load (`export`).
"""

from megatron_soaes.heads.config import HeadConfig
from megatron_soaes.heads.vocab import draft_vocabulary

__all__ = ["HeadConfig", "draft_vocabulary"]
