"""The best evaluation and the best checkpoint of a run, and when to stop early.

Two bests, as in Hugging Face's Trainer: early stopping counts every evaluation
(``observe``), while the best *checkpoint* is the saved one with the lowest eval loss
(``saved``; the loop evaluates at every save, so every checkpoint has one). Rotation never
deletes the best checkpoint, and its adapter is exported to ``adapter/best/`` at the end. The
state rides in each checkpoint's ``client_state``, so a resumed run keeps its best and its
patience count.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass
class BestTracker:
    """Lowest eval loss so far, the checkpoint that holds the lowest, and evaluations since an improvement."""

    best_loss: Optional[float] = None
    best_step: Optional[int] = None
    evals_without_improvement: int = 0
    checkpoint: Optional[str] = None  # folder of the best saved checkpoint (absolute: a resumed run may save elsewhere)
    checkpoint_loss: Optional[float] = None
    last: Optional[tuple[int, float]] = None  # (step, eval loss) of the latest evaluation

    def observe(self, step: int, eval_loss: float) -> bool:
        """One evaluation; True when it improved on the best (strictly lower loss)."""
        self.last = (step, eval_loss)
        if self.best_loss is None or eval_loss < self.best_loss:
            self.best_loss, self.best_step, self.evals_without_improvement = eval_loss, step, 0
            return True
        self.evals_without_improvement += 1
        return False

    def saved(self, folder: str, step: int) -> None:
        """A checkpoint was written at ``step``: it becomes the best one if that step's eval beats the best one's."""
        if self.last is None or self.last[0] != step:
            return
        loss = self.last[1]
        if self.checkpoint_loss is None or loss < self.checkpoint_loss:
            self.checkpoint, self.checkpoint_loss = folder, loss

    def stop_reason(self, patience: Optional[int]) -> Optional[str]:
        """Why to stop now (``patience`` evaluations without improvement), or None."""
        if patience is None or self.evals_without_improvement < patience:
            return None
        return (f"early stopping: eval loss did not improve for {patience} evaluations (best {self.best_loss:.4f} at "
                f"step {self.best_step})")

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, tuple(value) if key == "last" and value is not None else value)
