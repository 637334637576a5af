"""Model selection on the validation split: the best epoch so far, and early stopping with patience.

The best epoch is the one of highest ``val/acc`` (the first of equals). The state is a function of the epoch
records alone, so a resumed run rebuilds it from its history (``Selection.from_history``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BEST_NAME = "best.pt"  # the model of the best epoch, beside the last one's model.pt


@dataclass
class Selection:
    """The best validation accuracy seen and the epoch that reached it; ``patience`` (None: off) epochs
    without a better one stop the run."""

    patience: int | None = None
    best_epoch: int | None = None
    best_acc: float = -math.inf
    last_epoch: int = 0

    @classmethod
    def from_history(cls, history: list[dict], patience: int | None) -> Selection:
        selection = cls(patience)
        for record in history:
            selection.update(record)
        return selection

    def update(self, record: dict) -> bool:
        """Takes an epoch's record; True if its validation accuracy is the best so far (records without
        ``val/acc``, or with a non-finite one, never are)."""
        self.last_epoch = int(record["epoch"])
        acc = record.get("val/acc")
        if acc is None or not math.isfinite(acc) or acc <= self.best_acc:
            return False
        self.best_epoch, self.best_acc = self.last_epoch, float(acc)
        return True

    @property
    def should_stop(self) -> bool:
        """``patience`` epochs have passed since the best one."""
        return (
            self.patience is not None
            and self.best_epoch is not None
            and self.last_epoch - self.best_epoch >= self.patience
        )

    def metrics(self) -> dict[str, float]:
        """``best/epoch`` and ``best/val_acc`` (empty before any validation)."""
        if self.best_epoch is None:
            return {}
        return {"best/epoch": float(self.best_epoch), "best/val_acc": self.best_acc}
