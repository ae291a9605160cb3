"""Builders for remote write 2.0 bodies (no tests here), with the official schema
(proto/write_v2.proto -> m3shm.proto.write_v2_pb2)."""

from __future__ import annotations

from m3shm.proto import write_v2_pb2

Labels = dict[str, str] | list[tuple[str, str]]
# metadata: (type, help, unit)
Series2 = tuple[Labels, list[tuple[int, float]]] | tuple[Labels, list[tuple[int, float]],
                                                          tuple[int, str, str] | None]


class Symbols:
    """An interning table that starts with "" as the spec asks."""

    def __init__(self) -> None:
        self.table: list[str] = [""]
        self.index: dict[str, int] = {"": 0}

    def ref(self, s: str) -> int:
        if s not in self.index:
            self.index[s] = len(self.table)
            self.table.append(s)
        return self.index[s]


def request_v2(series: list[Series2], exemplars: int = 0,
               histograms: int = 0) -> write_v2_pb2.Request:
    """A 2.0 Request message; `exemplars`/`histograms` add that many to the first series."""
    sy = Symbols()
    req = write_v2_pb2.Request()
    for i, item in enumerate(series):
        labels, samples = item[0], item[1]
        meta = item[2] if len(item) > 2 else None
        ts = req.timeseries.add()
        for k, v in (labels.items() if isinstance(labels, dict) else labels):
            ts.labels_refs.extend([sy.ref(k), sy.ref(v)])
        for t, v in samples:
            s = ts.samples.add()
            s.timestamp, s.value = t, v
        if meta is not None:
            ts.metadata.type = meta[0]
            ts.metadata.help_ref = sy.ref(meta[1])
            ts.metadata.unit_ref = sy.ref(meta[2])
        if i == 0:
            for j in range(exemplars):
                ex = ts.exemplars.add()
                ex.labels_refs.extend([sy.ref("trace_id"), sy.ref(f"t{j}")])
                ex.value, ex.timestamp = 1.0, samples[0][0] if samples else 1
            for _ in range(histograms):
                h = ts.histograms.add()
                h.count_int, h.timestamp = 3, samples[0][0] if samples else 1
    req.symbols.extend(sy.table)
    return req


def write_request_v2(series: list[Series2], exemplars: int = 0, histograms: int = 0) -> bytes:
    """An uncompressed remote write 2.0 body."""
    return request_v2(series, exemplars, histograms).SerializeToString()


V2_HEADERS = {"Content-Type": "application/x-protobuf;proto=io.prometheus.write.v2.Request",
              "X-Prometheus-Remote-Write-Version": "2.0.0"}
