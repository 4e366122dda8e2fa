"""Draft-and-verify decoding with token trees and a native lossless verify op, on top of `inference`."""

from megatron_soaes.speculative.decode import SpecConfig, speculative_generate
from megatron_soaes.speculative.verify import native_available, tree_verify, tree_verify_reference

__all__ = ["SpecConfig", "native_available", "speculative_generate", "tree_verify", "tree_verify_reference"]
