"""Stopping rules against over-optimisation, and the record of the best evaluation.

The guard sees each epoch's metrics row and each evaluation; `check` returns the reason to stop
(a sentence naming the rule and the numbers) or None. Every rule is off at 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ddpo_lite.config import GuardConfig


@dataclass
class Guard:
    config: GuardConfig
    best_eval: float = -math.inf
    """Best evaluation reward so far; the baseline (before training) counts."""
    best_epoch: int = -1
    """Epochs completed at the best evaluation (0 = the base model); -1 = none yet."""
    evals_since_best: int = 0

    def observe_eval(self, value: float, epochs_done: int) -> bool:
        """Record an evaluation; True when it is a new best."""
        if math.isfinite(value) and value > self.best_eval:
            self.best_eval, self.best_epoch, self.evals_since_best = value, epochs_done, 0
            return True
        self.evals_since_best += 1
        return False

    def check(self, row: dict[str, Any]) -> str | None:
        """The reason to stop after this epoch's `row`, or None to go on."""
        g = self.config
        kl = row.get("kl_to_base", float("nan"))
        if g.max_kl and math.isfinite(kl) and kl > g.max_kl:
            return f"guard.max_kl: the KL from the base model {kl:.4g} exceeds {g.max_kl:g}"
        diversity = row.get("diversity", float("nan"))
        if g.min_diversity and math.isfinite(diversity) and diversity < g.min_diversity:
            return (
                f"guard.min_diversity: sample diversity {diversity:.4g} fell below "
                f"{g.min_diversity:g}"
            )
        if g.patience and self.evals_since_best >= g.patience:
            return (
                f"guard.patience: {self.evals_since_best} evaluations without beating the best "
                f"evaluation reward {self.best_eval:.4g} (after epoch {self.best_epoch})"
            )
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_eval": self.best_eval if math.isfinite(self.best_eval) else None,
            "best_epoch": self.best_epoch,
            "evals_since_best": self.evals_since_best,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        best = state.get("best_eval")
        self.best_eval = -math.inf if best is None else float(best)
        self.best_epoch = int(state.get("best_epoch", -1))
        self.evals_since_best = int(state.get("evals_since_best", 0))
