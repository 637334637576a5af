"""The one place that decides on ``torch.compile`` and falls back to the eager module when it fails."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vitbn.errors import first_line

log = logging.getLogger(__name__)


class Compiled:
    """A module, ``torch.compile``'d when asked, run through ``run``.

    Compiling happens lazily, at the first call of each stage (``"train"``, ``"evaluation"``): a failure there
    (or of ``torch.compile`` itself: an unsupported platform) switches this object to the eager module for good,
    with the reason warned once. A stage that ran compiled once is not guarded again, so later errors surface.

    Args:
        eager: the module (``nn.Module``, or DDP around one).
        compile: compile it.
    """

    def __init__(self, eager: nn.Module, compile: bool) -> None:
        self.eager = eager
        self.module = eager
        self.failure: str | None = None
        self._checked: set[str] = set()
        if compile:
            try:
                self.module = torch.compile(eager)
            except Exception as exc:  # e.g. an unsupported Python version or platform
                self._fall_back("setup", exc)

    @property
    def compiled(self) -> bool:
        return self.module is not self.eager

    def first_call(self, stage: str) -> bool:
        """Whether the next call of ``stage`` compiles it: a compiled module that has not run that stage yet."""
        return self.compiled and stage not in self._checked

    def run(self, stage: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(module, *args, **kwargs)``; on the first call of ``stage`` a compiler failure reruns it eagerly."""
        if not self.compiled or stage in self._checked:
            return fn(self.module, *args, **kwargs)
        try:
            out = fn(self.module, *args, **kwargs)
        except Exception as exc:
            self._fall_back(stage, exc)
            out = fn(self.module, *args, **kwargs)
        self._checked.add(stage)
        return out

    def _fall_back(self, stage: str, exc: Exception) -> None:
        self.module = self.eager
        self.failure = f"torch.compile failed in {stage} ({first_line(exc)}); using the eager model"
        warnings.warn(self.failure, stacklevel=4)
        log.info(self.failure)
