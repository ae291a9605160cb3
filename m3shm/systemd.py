"""systemd's notify protocol, without libsystemd: datagrams to ``$NOTIFY_SOCKET``.

The supervisor (the unit's main process; packaging/m3shm.service has ``NotifyAccess=main``)
sends newline-separated ``KEY=VALUE`` assignments as one datagram on an ``AF_UNIX``
``SOCK_DGRAM`` socket: a path, or an abstract address when the variable starts with ``@``.
Messages it sends:

- ``READY=1`` once every worker has finished recovery and serves;
- ``RELOADING=1`` + ``MONOTONIC_USEC=<CLOCK_MONOTONIC µs>`` at SIGHUP (systemd >= 253 wants
  the timestamp), then ``READY=1`` when the workers apply the new config (or it was refused);
- ``STOPPING=1`` at SIGTERM/SIGINT;
- ``WATCHDOG=1`` every ``WATCHDOG_USEC / 2``, but only while every worker's heartbeat is fresh
  (see :mod:`m3shm.supervisor`), so a hung worker lets systemd's watchdog fire;
- ``STATUS=…`` with a one-line description.

Without ``NOTIFY_SOCKET`` every call is a no-op. ``WATCHDOG_PID``, when set, must name this
process, else the watchdog is not for us (sd_watchdog_enabled does the same).
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("m3shm.systemd")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self.addr: str | bytes | None = None
        if addr.startswith("@"):
            self.addr = b"\0" + addr[1:].encode()
        elif addr.startswith("/"):
            self.addr = addr
        elif addr:
            log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract address; "
                        "not notifying systemd", addr)
        self.sock: socket.socket | None = None
        self.watchdog_s = 0.0
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        return self.addr is not None

    def send(self, *assignments: str) -> bool:
        """Send one datagram; False (logged once per failure) if it could not be sent."""
        if self.addr is None:
            return False
        msg = "\n".join(assignments).encode()
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.sendto(msg, self.addr)
            return True
        except OSError as e:
            log.warning("systemd notify %r failed: %s", assignments, e)
            return False

    def ready(self, status: str = "") -> None:
        extra = [f"STATUS={status}"] if status else []
        self.send("READY=1", *extra)

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog_due(self, now: float) -> bool:
        """True when a ping is due (every half watchdog interval)."""
        return self.watchdog_s > 0 and now - self._last_ping >= self.watchdog_s / 2

    def watchdog(self, now: float) -> None:
        self._last_ping = now
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
