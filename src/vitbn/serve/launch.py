"""``vitbn serve`` in a child process on a free loopback port, for the browser test, the load test and the
screenshot script: started, waited for (``/healthz``), stopped; and the system Chromium they drive."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

from vitbn.errors import UserError

# Headless Chromium on a machine with a closed network: without the background-networking flags it keeps trying
# hosts that are refused.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def chromium_path() -> str:
    """The system Chromium (Debian's package; ``$VITBN_CHROMIUM`` wins): Playwright drives it through
    ``executable_path``, as its own browser download is not used."""
    return os.environ.get("VITBN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(serve_args: list[str], *, timeout: float = 60.0, host: str = "127.0.0.1") -> Iterator[str]:
    """Runs ``vitbn serve SERVE_ARGS --host HOST --port <free>`` and yields its base URL once ``/healthz``
    answers; the process is terminated on exit.

    Raises:
        UserError: the server exited or did not answer within ``timeout`` seconds (its output in the message).
    """
    port = free_port(host)
    cmd = [sys.executable, "-m", "vitbn", "serve", *serve_args, "--host", host, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(url + "/healthz", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    output = " | ".join(proc.communicate()[0].strip().splitlines()[-3:])
                    raise UserError(f"vitbn serve did not come up on {url}: {output}") from None
                time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
