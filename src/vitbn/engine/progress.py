"""Progress output of a training run: a tqdm bar on a terminal, one line per epoch otherwise."""

from __future__ import annotations

import sys

from vitbn.engine.history import format_epoch

PROGRESS_MODES = ("auto", "bar", "lines", "none")


class Progress:
    """Reports a run's progress.

    Args:
        mode: ``"bar"`` (a tqdm bar over the batches of each epoch on stderr, and the epoch's line),
            ``"lines"`` (one line per epoch on stdout), ``"none"``, or ``"auto"`` (bar when stderr is a
            terminal, else lines). None means ``"none"``.
        epochs: the total number of epochs, for ``epoch 3/30``.
    """

    def __init__(self, mode: str | None, epochs: int) -> None:
        mode = mode or "none"
        if mode not in PROGRESS_MODES:
            raise ValueError(f"progress={mode!r} is not one of {', '.join(repr(m) for m in PROGRESS_MODES)}")
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode
        self.epochs = epochs
        self._bar = None

    def start_epoch(self, epoch: int, batches: int) -> None:
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=batches, desc=f"epoch {epoch}/{self.epochs}", unit="batch", leave=False)

    def step(self) -> None:
        if self._bar is not None:
            self._bar.update()

    def end_epoch(self, record: dict) -> None:
        self._close_bar()
        self.message(format_epoch(record, self.epochs))

    def message(self, text: str) -> None:
        if self.mode == "bar":
            from tqdm.auto import tqdm

            tqdm.write(text)
        elif self.mode == "lines":
            print(text, flush=True)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self._close_bar()
