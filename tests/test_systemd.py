"""systemd notify protocol end to end: a real daemon, a fake NOTIFY_SOCKET in the test.

The supervisor must say READY=1 once every worker recovered, RELOADING=1 (+ MONOTONIC_USEC)
then READY=1 on SIGHUP, STOPPING=1 on SIGTERM, and feed the watchdog every WATCHDOG_USEC/2
only while every worker's heartbeat is fresh: a SIGSTOPped worker stops the pings, SIGCONT
brings them back.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest
from test_daemon_harness import Daemon

from m3shm.systemd import Notifier


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: a datagram socket, path or abstract."""

    def __init__(self, tmp: Path, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"m3shm-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            path = str(tmp / "notify.sock")
            self.sock.bind(path)
            self.env = path
        self.events: list[str] = []   # every message but the watchdog pings and STATUS

    def recv(self, timeout: float) -> dict[str, str] | None:
        """The next message as a dict, or None when nothing came within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        msg = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        kinds = [f"{k}={v}" for k, v in msg.items() if k not in ("WATCHDOG", "STATUS",
                                                                  "MONOTONIC_USEC")]
        self.events += kinds
        return msg

    def wait_for(self, key: str, timeout: float = 30) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.recv(left)
            if msg is not None and key in msg:
                return msg
        raise AssertionError(f"no {key} within {timeout}s; got {self.events}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake(tmp_path: Path, request: pytest.FixtureRequest):
    f = FakeSystemd(tmp_path, getattr(request, "param", True))
    yield f
    f.close()


def test_lifecycle_and_watchdog_follow_worker_health(tmp_path: Path, fake: FakeSystemd) -> None:
    d = Daemon(tmp_path)
    d.start(wait=False, env={"NOTIFY_SOCKET": fake.env, "WATCHDOG_USEC": "400000"})
    try:
        fake.wait_for("READY")
        assert d.get("/ready")[0] == 200     # READY=1 means recovery is done everywhere
        fake.wait_for("WATCHDOG", 10)
        worker = d.workers()[0]
        os.kill(worker, signal.SIGSTOP)
        try:
            # pings every 0.2 s while healthy; the heartbeat goes stale after 2 s: expect a
            # silence of 1.5 s (never seen while every worker is healthy) within 15 s
            deadline = time.monotonic() + 15
            while True:
                assert time.monotonic() < deadline, "watchdog pings went on with a stopped worker"
                msg = fake.recv(1.5)
                if msg is None:
                    break
                assert "READY" not in msg and "STOPPING" not in msg, msg
        finally:
            os.kill(worker, signal.SIGCONT)
        fake.wait_for("WATCHDOG", 10)
        t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        msg = fake.wait_for("RELOADING", 10)
        t1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert t0 <= int(msg["MONOTONIC_USEC"]) <= t1
        fake.wait_for("READY", 15)
        assert d.get("/ready")[0] == 200
    finally:
        code = d.stop()
    fake.wait_for("STOPPING", 5)
    assert code == 0, d.logtext()
    assert fake.events == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"], fake.events


@pytest.mark.parametrize("fake", [False], indirect=True)
def test_path_socket_and_watchdog_for_another_pid(tmp_path: Path, fake: FakeSystemd) -> None:
    """A filesystem NOTIFY_SOCKET works too; WATCHDOG_PID naming another process means the
    watchdog is not ours, so no pings."""
    d = Daemon(tmp_path, workers=1)
    d.start(wait=False, env={"NOTIFY_SOCKET": fake.env, "WATCHDOG_USEC": "200000",
                             "WATCHDOG_PID": "1"})
    try:
        fake.wait_for("READY")
        pings = 0
        while (msg := fake.recv(1.0)) is not None:  # 10 ping intervals of silence
            pings += "WATCHDOG" in msg
        assert pings == 0
    finally:
        assert d.stop() == 0
    fake.wait_for("STOPPING", 5)
    assert fake.events == ["READY=1", "STOPPING=1"]


def test_notifier_addresses(tmp_path: Path) -> None:
    assert not Notifier({}).enabled
    assert not Notifier({}).send("READY=1")
    assert Notifier({"NOTIFY_SOCKET": "@abc"}).addr == b"\0abc"
    assert Notifier({"NOTIFY_SOCKET": "/run/x"}).addr == "/run/x"
    assert not Notifier({"NOTIFY_SOCKET": "relative"}).enabled
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "absent.sock"), "WATCHDOG_USEC": "1000000"})
    assert n.watchdog_s == 1.0 and n.watchdog_due(time.monotonic())
    assert not n.send("READY=1")  # nobody listening: logged, not raised
    assert Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_s == 0
    assert Notifier({"WATCHDOG_USEC": "x"}).watchdog_s == 0


def test_sigterm_while_a_worker_restarts_stops_cleanly(tmp_path: Path) -> None:
    """Regression: a SIGTERM that reached a just-forked worker before it installed its
    handlers was lost (the worker kept serving and the daemon never exited)."""
    for trial in range(3):
        (tmp_path / str(trial)).mkdir()
        d = Daemon(tmp_path / str(trial)).start()
        victim = d.workers()[1]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while victim in d.workers() or len(d.workers()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        assert d.stop(timeout=60) == 0, d.logtext()
