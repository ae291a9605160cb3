"""A daemon for a perf driver: ``with perfdaemon.serve(config_yaml) as d:`` starts
``m3shm serve`` on a free port with that config and a temporary data directory, waits for
/ready (raising with the log's tail if it exits or takes longer than ``ready_s``), and stops
it with SIGTERM on the way out. ``metric(url, name)`` reads one unlabelled value of /metrics.
Used by perf/downsample.py --daemon, perf/rules_change.py and perf/idle_cpu.py.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Running:
    url: str
    proc: subprocess.Popen
    dir: Path  # the temporary directory: m3shm.yaml, data/, daemon.log
    log: Path


def free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


@contextmanager
def serve(config: str, prefix: str = "m3shm-perf-", ready_s: float = 60) -> Iterator[Running]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        d = Path(tmp)
        (d / "m3shm.yaml").write_text(config)
        log = d / "daemon.log"
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from m3shm.cli import main; sys.exit(main())",
                 "serve", "-c", str(d / "m3shm.yaml"), "--data", str(d / "data"), "--listen",
                 f"127.0.0.1:{port}"], stdout=logf, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + ready_s
            while True:
                try:
                    with urllib.request.urlopen(url + "/ready", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log.read_text(errors="replace")[-3000:])
                time.sleep(0.1)
            yield Running(url, proc, d, log)
        finally:
            proc.terminate()
            proc.wait(120)


def metric(url: str, name: str) -> float:
    """The value of the unlabelled sample ``name`` on /metrics (0 if absent)."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        m = re.search(rf"^{name} (\S+)$", r.read().decode(), re.M)
    return float(m.group(1)) if m else 0.0
