"""Checkpoint formats: HF <-> megatron torch_dist conversion, streamed DCP I/O, atomic directories."""
