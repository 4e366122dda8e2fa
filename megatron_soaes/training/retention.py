"""The general-ability gate of a training phase (`train.retention`): the held-out general text's loss and
next-token accuracy at the phase's start are the baseline; every evaluation compares with it (retention =
perplexity at the start / perplexity now, or accuracy now / accuracy at the start; both are recorded, the
bound applies to `metric`) and acts -- warn, stop, or keep the best domain checkpoint that stays above the
bound. Its state travels in checkpoints, so a resumed run judges against the same baseline."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

EXIT_RETENTION = 3  # the CLI's exit status when a run stopped at its gate
from megatron_soaes.checkpoint.load import RETENTION_FILE  # noqa: F401  (the run's record; resolve_checkpoint reads it)


class RetentionBreached(RuntimeError):
    """action: stop -- the run saved and ended because general ability fell below the bound."""

    def __init__(self, step: int, ratio: float, bound: float, checkpoint):
        self.step, self.ratio, self.bound, self.checkpoint = step, ratio, bound, checkpoint
        super().__init__(f"retention gate: general-ability retention {ratio:.4f} < train.retention.min_ratio {bound} at "
                         f"step {step}; the run stopped (action: stop) and saved {checkpoint}")


@dataclass
class RetentionGate:
    min_ratio: float
    action: str
    base_loss: float
    best: dict | None = None  # keep_best: {"step", "select_loss", "ratio", "checkpoint"}
    history: list = field(default_factory=list)
    base_accuracy: float | None = None
    metric: str = "perplexity"  # what the bound applies to: perplexity | accuracy

    def judge(self, step: int, general_loss: float, accuracy: float, select_loss: float | None) -> dict:
        """One evaluation's decision: {"step", "general_loss", "accuracy", "ratio" (of `metric`), "ppl_ratio",
        "accuracy_ratio", "ok", "decision"} where decision is ok | warn | stop | best (a new best under
        keep_best: the caller saves it) | kept (keep_best, not better)."""
        ppl_ratio = math.exp(self.base_loss - general_loss)
        acc_ratio = accuracy / self.base_accuracy if self.base_accuracy else float("nan")
        r = acc_ratio if self.metric == "accuracy" else ppl_ratio
        ok = r >= self.min_ratio
        if not ok:
            decision = {"warn": "warn", "stop": "stop", "keep_best": "kept"}[self.action]
        elif self.action == "keep_best" and select_loss is not None and (
                self.best is None or select_loss < self.best["select_loss"]):
            decision = "best"
        else:
            decision = "ok" if self.action != "keep_best" else "kept"
        rec = {"step": step, "general_loss": general_loss, "accuracy": accuracy, "ratio": r, "ppl_ratio": ppl_ratio,
               "accuracy_ratio": acc_ratio, "ok": ok, "decision": decision, "select_loss": select_loss}
        self.history.append(rec)
        return rec

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def restore(cls, state: dict) -> "RetentionGate":
        return cls(**state)
