"""Per-step mixture-of-experts metrics: each MoE layer's load-balancing loss and router z-loss (when on;
megatron-core's tracker) and its expert load -- tokens routed to each expert over the global batch, as max / mean (1.0 = perfectly
balanced; E / k = every token on the same k experts). Counted by a hook on each router, whose output is
(probs, routing_map [tokens, experts])."""

from __future__ import annotations

import torch


class MoEMetrics:
    def __init__(self, model, cfg, device):
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.moe_layer import MoELayer

        self.counts = torch.zeros(cfg.num_layers, cfg.num_experts, dtype=torch.float64, device=device)
        # every MoE layer of the model, not only this pipeline stage's: rank 0 logs all of them (summed over ranks)
        self.sparse = torch.tensor(cfg.moe_layers(), dtype=torch.bool)
        # tokens each rank routes: disjoint over DP / CP / EP ranks and over TP ranks with sequence parallelism
        # (each holds a slice of the sequence); without it TP ranks route the same tokens
        self.replicas = 1 if model.config.sequence_parallel else ps.get_tensor_model_parallel_world_size()
        for module in model.modules():
            if isinstance(module, MoELayer):
                module.router.register_forward_hook(self._hook(module.layer_number - 1))

    def _hook(self, layer: int):
        def count(module, args, output):
            if module.training:
                self.counts[layer] += output[1].sum(0).to(self.counts)
        return count

    def collect(self, num_microbatches: int) -> dict:
        """This step's figures (collective: every rank calls it); resets the counts and megatron's tracker."""
        from megatron.core.transformer.moe.moe_utils import (clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker,
                                                             reduce_aux_losses_tracker_across_ranks)

        torch.distributed.all_reduce(self.counts)
        counts = (self.counts / self.replicas)[self.sparse.to(self.counts.device)]
        self.counts.zero_()
        load = (counts.max(1).values / counts.mean(1).clamp_min(1e-9)).tolist()
        out = {"moe_load_max_over_mean": load, "moe_load_worst": max(load) if load else None}
        tracker = get_moe_layer_wise_logging_tracker()
        if tracker:
            reduce_aux_losses_tracker_across_ranks()
        for name, key in (("load_balancing_loss", "moe_aux_loss"), ("z_loss", "moe_z_loss")):
            if name in tracker:  # per layer, before its coefficient
                values = tracker[name]["values"].float() / num_microbatches
                values = values[self.sparse.to(values.device)]
                out[key], out[f"{key}_per_layer"] = values.mean().item(), values.tolist()
        clear_aux_losses_tracker()
        return out
