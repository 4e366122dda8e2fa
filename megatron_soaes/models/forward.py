"""Forward-only passes through a (TP/PP-split) megatron model via megatron-core's schedules."""

from __future__ import annotations

import torch


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def forward_logits(model, tokens: torch.Tensor, micro_batch_size: int | None = None) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, V_padded] on the last pipeline stage (None on the others).

    Works at any TP/PP: the pipeline schedule moves activations between stages, and the
    vocab-parallel logits are gathered across the tensor-parallel group.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    models = model if isinstance(model, list) else [model]
    mbs = micro_batch_size or tokens.shape[0]
    if tokens.shape[0] % mbs:
        raise ValueError(f"batch {tokens.shape[0]} not divisible by micro batch {mbs}")
    device = next(models[0].parameters()).device
    batches = iter(list(tokens.to(device).split(mbs)))

    def step(data_iterator, m):
        toks = next(data_iterator)
        out = m(toks, position_ids_for(toks), attention_mask=None)

        def collect(output, non_loss_data=False):
            return gather_from_tensor_model_parallel_region(output)

        return out, collect

    for m in models:
        m.eval()
    with torch.no_grad():
        outs = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=batches,
            model=models,
            num_microbatches=tokens.shape[0] // mbs,
            seq_length=tokens.shape[1],
            micro_batch_size=mbs,
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat(outs, dim=0)
