"""PMC's stopping rule, checked at every evaluated epoch (evaluation.eval_every) on the two drift figures
PMCLoop.drift measures without any ground truth: the run ends once the greedy forget answers have moved far
enough from the original model's (pmc.stop_at_reference_recall), or once the keep answers have moved too
far from their own starting answers (pmc.stop_below_keep_recall; the model that crossed the floor is the
final one, so set it with that in mind)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StoppingRule:
    reference_recall_at_most: float | None = None
    keep_recall_below: float | None = None

    @classmethod
    def from_config(cls, pmc: Any) -> "StoppingRule":
        return cls(pmc.stop_at_reference_recall, pmc.stop_below_keep_recall)

    @property
    def active(self) -> bool:
        return self.reference_recall_at_most is not None or self.keep_recall_below is not None

    def reason(self, fields: dict[str, Any]) -> str | None:
        """Why the run stops after the epoch whose metrics line holds `fields`; None: it goes on (an epoch
        that was not evaluated has no drift figures and never stops the run)."""
        reference = fields.get("drift_reference_recall")
        if self.reference_recall_at_most is not None and reference is not None \
                and reference <= self.reference_recall_at_most:
            return (f"drift_reference_recall {reference:.4f} <= pmc.stop_at_reference_recall "
                    f"{self.reference_recall_at_most}")
        keep = fields.get("drift_keep_recall")
        if self.keep_recall_below is not None and keep is not None and keep < self.keep_recall_below:
            return f"drift_keep_recall {keep:.4f} < pmc.stop_below_keep_recall {self.keep_recall_below}"
        return None
