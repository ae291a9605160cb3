"""``GET /api/v1/rules`` and ``PUT /api/v1/rules``: the downsampling rules of a running daemon.

GET answers what the answering worker has installed (``X-M3shm-Worker`` names it): the newest
version, its activation time, where it came from, the rules in M3's shape, each policy with
the namespace it writes to and the rules that write there, and the version in force now.
``ETag`` is the version.

PUT takes the rules as JSON (``Content-Type: application/json``) or YAML (anything else), in
M3's shape (``{mappingRules, rollupRules, defaultPolicies}``) or as a config file with
``downsample.rules``. It is validated exactly as the config is (400 with the config's message,
``downsample.rules.mappingRules[0].filter: ...``), refused with 400 when a policy needs a
namespace the running daemon does not have ("needs a restart"), and with 409 when
``If-Match: <version>`` is not the newest version. Otherwise it becomes the next version
(m3shm/rules/versions.py: file written under the rules lock, then the stats header), this
worker installs it at once and the others on their next heartbeat; the answer is GET's.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from m3shm.net.http import Request, Response
from m3shm.rules import versions
from m3shm.rules.policy import RuleError
from m3shm.rules.ruleset import RuleSet, parse_rules, parse_yaml

if TYPE_CHECKING:
    from m3shm.workers.worker import Worker

PATH = "/api/v1/rules"
KEY = "downsample.rules"
WORKER_HEADER = "X-M3shm-Worker"


def _json(status: int, doc: Any, **headers: str) -> Response:
    body = json.dumps(doc, separators=(",", ":")).encode()
    return Response(status, body, "application/json", headers=headers)


def _error(status: int, kind: str, msg: str, w: Worker) -> Response:
    return _json(status, {"status": "error", "errorType": kind, "error": msg},
                 **{WORKER_HEADER: str(w.index)})


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def describe(w: Worker, now_ms: int) -> dict[str, Any]:
    """GET's ``data``: the answering worker's view."""
    sync = w.rules
    newest = sync.newest
    if newest is None:
        return {"version": 0, "worker": w.index}
    chain = sync.chain(now_ms)
    return {"version": newest.version, "activation_ms": newest.activation_ms,
            "activation": _iso(newest.activation_ms), "updated_ms": newest.rules.updated_ms,
            "source": newest.source, "active": newest.activation_ms <= now_ms,
            "in_force_version": chain[0].version, "worker": w.index,
            "pending": [{"version": v.version, "activation_ms": v.activation_ms}
                        for v in chain[1:]],
            "rules": newest.rules.to_dict(), "policies": versions.writers(newest.rules)}


def parse_body(body: bytes, content_type: str) -> RuleSet:
    """The rules a PUT carries; RuleError naming the key when they are not valid."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise RuleError(f"{KEY}: the body is not UTF-8") from None
    if content_type.split(";", 1)[0].strip().lower() == "application/json":
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise RuleError(f"{KEY}: not valid JSON: {e}") from None
        if isinstance(doc, dict) and "downsample" in doc:
            ds = doc["downsample"]
            if not isinstance(ds, dict):
                raise RuleError(f"downsample: expected a mapping, got {ds!r}")
            doc = ds.get("rules")
        return parse_rules(doc, KEY)
    return parse_yaml(text, KEY)


def _replace(w: Worker, new: RuleSet, if_match: int | None) -> tuple[int, str]:
    """Write the next version (pool thread: flock, fsync). (0, "") or (status, error)."""
    cfg = w.cfg
    lacking = versions.missing_namespace(new, cfg.namespaces)
    if lacking is not None:
        return 400, lacking
    raw = cfg.raw_namespace
    margin = versions.margin_ms(cfg.downsample.admission_ms, raw.buffer_past_ms,
                                raw.buffer_future_ms)
    with versions.locked(w.data_dir):
        chain = versions.load(w.data_dir)
        if chain is None:
            return 503, f"{versions.RULES_FILE} is missing from {w.data_dir}"
        if if_match is not None and if_match != chain.newest.version:
            return 409, (f"If-Match: version {if_match} is not the newest; the rules are at "
                         f"version {chain.newest.version}")
        chain = versions.append(chain, new, "api", int(time.time() * 1000), margin)
        versions.save(chain, w.data_dir)
        versions.publish(w.statsfile, chain, changed=True)
    return 0, ""


async def handle(w: Worker, req: Request) -> Response:
    if req.method == "GET":
        data = describe(w, int(time.time() * 1000))
        return _json(200, {"status": "success", "data": data},
                     **{WORKER_HEADER: str(w.index), "ETag": f'"{data["version"]}"'})
    if req.method != "PUT":
        return _error(405, "bad_data", f"{PATH} takes GET or PUT", w)
    if req.too_large:
        return _error(400, "bad_data", "the body is larger than limits.max_body_bytes", w)
    if_match = None
    raw = req.headers.get("if-match")
    if raw is not None:
        try:
            if_match = int(raw.strip().removeprefix("W/").strip('"'))
        except ValueError:
            return _error(400, "bad_data", f"If-Match: expected a rules version (an integer), "
                                           f"got {raw!r}", w)
    try:
        new = parse_body(req.body, req.headers.get("content-type", ""))
    except RuleError as e:
        return _error(400, "bad_data", str(e), w)
    loop = asyncio.get_running_loop()
    status, msg = await loop.run_in_executor(w.pool, _replace, w, new, if_match)
    if status:
        kind = {400: "bad_data", 409: "conflict"}.get(status, "unavailable")
        return _error(status, kind, msg, w)
    w.rules.check()
    data = describe(w, int(time.time() * 1000))
    return _json(200, {"status": "success", "data": data},
                 **{WORKER_HEADER: str(w.index), "ETag": f'"{data["version"]}"'})
