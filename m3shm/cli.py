"""The ``m3shm`` command line: one subcommand per job.

Each subcommand is a function ``cmd_<name>(args) -> int`` registered in :func:`build_parser`;
heavy imports happen inside the function, so ``m3shm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys

from m3shm import __version__


def cmd_codec_stats(args: argparse.Namespace) -> int:
    """Encode every series of an export file and report the codec's size figures."""
    from m3shm import codec
    from m3shm.dataset import default_dataset, read_export

    if args.dataset is None:
        args.dataset = str(default_dataset())
    rows = []
    for s in read_export(args.dataset):
        if len(s.timestamps) == 0:
            continue
        block = codec.encode(s.timestamps, s.values)
        ts, vs = codec.decode(block)
        exact = bool((ts == s.timestamps).all() and
                     (vs.view("u8") == s.values.view("u8")).all())
        rows.append((s.labels.get("__name__", "?"), len(ts), len(block), exact))
    samples = sum(r[1] for r in rows)
    size = sum(r[2] for r in rows)
    out = {
        "dataset": str(args.dataset),
        "series": len(rows),
        "samples": samples,
        "bytes": size,
        "bytes_per_sample": round(size / samples, 4) if samples else None,
        "bits_per_sample": round(size * 8 / samples, 3) if samples else None,
        "raw_bytes_per_sample": 16,
        "lossless": all(r[3] for r in rows),
    }
    if args.json:
        print(json.dumps(out))
        return 0 if out["lossless"] else 1
    for k, v in out.items():
        print(f"{k:>22}: {v}")
    print(f"\nmost expensive series (bytes per sample), top {args.top}:")
    for name, n, nbytes, _ in sorted(rows, key=lambda r: -r[2] / r[1])[: args.top]:
        print(f"  {nbytes / n:7.3f}  {n:6d} samples  {name}")
    return 0 if out["lossless"] else 1


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the daemon: a supervisor and one worker per core (m3shm/supervisor.py)."""
    from m3shm.config import ConfigError, load
    from m3shm.supervisor import serve

    try:
        overrides = {"listen": args.listen, "data_dir": args.data, "workers": args.workers}
        cfg = load(args.config, **overrides)
    except ConfigError as e:
        print(f"m3shm serve: {e}", file=sys.stderr)
        return 2
    return serve(cfg, args.config, overrides)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="m3shm", description="m3shm: a Prometheus long-term metrics store.")
    p.add_argument("--version", action="version", version=f"m3shm {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    cs = sub.add_parser("codec-stats", help="codec size figures on a series export file",
                        description=cmd_codec_stats.__doc__)
    # no numpy at parser-build time: `serve` forks workers and must not have loaded it
    cs.add_argument("--dataset", default=None,
                    help="VictoriaMetrics export JSON lines, .gz or plain "
                         "(default: the shared reference dataset)")
    cs.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    cs.add_argument("--top", type=int, default=10, help="series to list (default 10)")
    cs.set_defaults(func=cmd_codec_stats)

    sv = sub.add_parser("serve", help="run the daemon", description=cmd_serve.__doc__)
    sv.add_argument("-c", "--config", help="YAML config file (default: embedded defaults)")
    sv.add_argument("--listen", help="HOST:PORT for HTTP (default 127.0.0.1:7201)")
    sv.add_argument("--data", help="data directory (default ./data or $M3SHM_DATA)")
    sv.add_argument("--workers", type=int, help="worker processes (default: one per core)")
    sv.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except (OSError, ValueError) as e:
        print(f"m3shm {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
