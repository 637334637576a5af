"""Where a published figure comes from: the command that wrote it, when, at which commit, on which machine.

Every page under docs/ that shows numbers carries a ``provenance_line``; the JSON a command writes next to its page
carries the same ``Provenance`` as a dict, so the page can be rendered again from that file.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from vitbn.errors import UserError

_SOURCES = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Provenance:
    """``command``: the shell command (``vitbn report quick --out docs/results/quick``); ``date``: UTC, ISO 8601 to the
    second; ``commit``: the vitbn sources' git commit (``"unknown"`` outside a checkout) and ``dirty`` whether
    tracked files differed from it; ``machine``: CPU model and cores, or the GPU; ``torch``: its version."""

    command: str
    date: str
    commit: str
    dirty: bool
    machine: str
    torch: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Provenance:
        try:
            return cls(**{name: data[name] for name in cls.__dataclass_fields__})
        except (KeyError, TypeError) as exc:
            raise UserError(
                f"provenance record is missing {exc} (expected {', '.join(cls.__dataclass_fields__)})"
            ) from None

    def line(self) -> str:
        """``Made by `CMD` on 2026-12-07 11:30 UTC at commit abc1234 on AMD EPYC (2 logical cores visible),
        torch 2.13.0+cpu.``"""
        when = self.date.replace("T", " ")[:16] + " UTC"
        commit = self.commit[:7] + (" with uncommitted changes" if self.dirty else "")
        return f"Made by `{self.command}` on {when} at commit {commit} on {self.machine}, torch {self.torch}."


_INVOKED: list[str] | None = None  # the arguments ``vitbn.cli.main`` was called with (also when called in-process)


def invoked_as(args: list[str]) -> None:
    """Records the arguments of the ``vitbn`` command running now: ``command_line()`` names it."""
    global _INVOKED
    _INVOKED = list(args)


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user would type it: ``vitbn ...`` for the CLI (the arguments of the running ``vitbn``
    command when there is one and ``argv`` is not given), ``python path/script.py ...`` for a script (paths relative
    to the working directory when they lie under it)."""
    if argv is None and _INVOKED is not None:
        argv = ["vitbn", *_INVOKED]
    argv = list(sys.argv if argv is None else argv)
    prog = Path(argv[0]) if argv else Path("vitbn")
    if prog.name in ("vitbn", "__main__.py"):
        head = ["vitbn"]
    else:
        try:
            script = str(prog.resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            script = str(prog)
        head = ["python", script]
    return shlex.join(head + argv[1:])


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], cwd=_SOURCES, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None


def source_commit() -> tuple[str, bool]:
    """(commit, dirty) of the checkout holding the vitbn sources; ("unknown", False) outside one."""
    head = _git("rev-parse", "HEAD")
    if head is None or head.returncode != 0 or not head.stdout.strip():
        return "unknown", False
    status = _git("status", "--porcelain", "--untracked-files=no")
    return head.stdout.strip(), bool(status is not None and status.stdout.strip())


def machine_name(device: str = "cpu") -> str:
    """The device in words with the machine's core count: "AMD EPYC 7B13 (2 logical cores visible)", "NVIDIA H100
    80GB HBM3 (16 CPU cores)"."""
    import torch

    from vitbn.bench.system import device_name

    dev = torch.device(device)
    name = device_name(dev)
    return name if dev.type == "cpu" else f"{name} ({os.cpu_count()} CPU cores)"


def current(command: str | None = None, device: str = "cpu") -> Provenance:
    """The provenance of a page written now by this process (``command`` defaults to ``command_line()``)."""
    import torch

    commit, dirty = source_commit()
    return Provenance(
        command=command or command_line(),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        commit=commit,
        dirty=dirty,
        machine=machine_name(device),
        torch=torch.__version__,
    )
