"""Flip a byte in each section of a version-4 fileset (the section table and its CRC, info,
summaries, bloom, index, data, reverse index), each in another fileset, and read
through a daemon: the export names every corrupt file and section (and the daemon logs it),
and everything else — other blocks, other shards, the other summary groups of a fileset whose
data has one bad zstd frame — reads back exactly; new writes still work."""

from __future__ import annotations

from test_daemon_harness import Daemon, now_ms, parse_export_line

from m3shm.shm import parse_labels
from m3shm.storage.fileset import HEADER, SECTION, SECTIONS, Fileset, Kind, list_filesets

BLOCK = 2000
CFG = """
namespaces:
  - {name: default, retention: 1h, blockSize: 2s, bufferPast: 1s, bufferFuture: 1s}
flush: {interval: 1h}
"""


def flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def test_flipped_byte_in_each_file_is_named_and_the_rest_reads(tmp_path):
    d = Daemon(tmp_path, extra=CFG).start()
    now = now_ms()
    starts = [now - now % BLOCK - BLOCK * k for k in range(2, 11)]  # 9 closed blocks
    want: dict = {}
    series = []
    for i in range(24):
        lab = {"__name__": "k", "i": str(i)}
        smp = [(bs + 100 + 10 * j + i, float(i * 100 + j) / 3) for bs in starts
               for j in range(4)]
        series.append((lab, smp))
        want[tuple(sorted(lab.items()))] = dict(smp)
    code, body, _ = d.write(series)
    assert code == 204, body
    assert d.post("/api/v1/admin/flush", b"")[0] == 200
    assert d.stop() == 0

    root = d.data / "filesets"
    fids = list_filesets(root)
    assert len(fids) >= 9
    kinds = ["table", "table_crc", *SECTIONS]
    bad: list[tuple[str, str]] = []  # (file, section or "") each export error must name
    lost = set()  # (series labels, block start)
    for kind, fid in zip(kinds, fids[:: len(fids) // len(kinds)], strict=False):
        with Fileset(root, fid) as fs:
            assert fs.version == 4
            ids = [sid for sid, _h, _b in fs]
            table = {Kind(k): (off, n) for k, _f, _r, _c, off, n in (
                SECTION.unpack_from(fs._maps[Kind.SEALED], HEADER.size + 4 + SECTION.size * i)
                for i in range(len(SECTIONS)))}
        path = fid.path(root, Kind.SEALED)
        if kind == "table":
            off, section = HEADER.size + 4 + 2, ""  # a section entry's reserved bytes
        elif kind == "table_crc":  # right after the table
            off, section = HEADER.size + 4 + SECTION.size * len(table) + 1, ""
        else:
            section = kind.name.lower()
            start, n = table[kind]
            # data: the first zstd frame's magic, i.e. the first summary group's series
            off = start + 1 if kind == Kind.DATA else start + n // 2
        flip(path, off)
        bad.append((str(path), section))
        hit = ids[: fs.info.summary_every] if kind == Kind.DATA else ids
        lost |= {(tuple(sorted(parse_labels(sid).items())), fid.block_start) for sid in hit}
    assert len(bad) == len(kinds)

    for key in want:
        want[key] = {t: v for t, v in want[key].items()
                     if (key, t - t % BLOCK) not in lost}
    d.start()
    try:
        for _ in range(2):  # twice: nothing corrupt is cached as good
            code, body = d.get("/api/v1/export?match[]=k")
            assert code == 200
            rows = [parse_export_line(x) for x in body.decode().splitlines()]
            errors = [r["error"] for r in rows if "error" in r]
            got = {tuple(sorted(r["metric"].items())):
                   dict(zip(r["timestamps"], r["values"], strict=True))
                   for r in rows if "metric" in r}
            assert got == {k: v for k, v in want.items() if v}
            for p, section in bad:
                named = f"{p} (section {section})" if section else p
                assert any(named in e and "corrupt" in e for e in errors), \
                    f"{named}\n" + "\n".join(errors)
            assert len(errors) == len(bad), errors
        t = now_ms()
        code, body, _ = d.write([({"__name__": "k2"}, [(t, 1.0)])])
        assert code == 204, body
        rows = [parse_export_line(x) for x in
                d.get("/api/v1/export?match[]=k2")[1].decode().splitlines()]
        # a fileset that cannot be opened may hold any series: its error comes with every
        # export over its block
        assert [(r["metric"], r["values"]) for r in rows if "metric" in r] == [
            ({"__name__": "k2"}, [1])]
        log = d.log.read_text()
        assert all(p in log for p, _s in bad)
    finally:
        assert d.stop() == 0
