"""Downsampling rules: M3-style mapping and rollup rules, and their aggregation windows.

- :mod:`m3shm.rules.policy`   storage policies (``resolution:retention``)
- :mod:`m3shm.rules.filters`  M3 tag filters (``__name__:disk_used* device:sd*``)
- :mod:`m3shm.rules.ruleset`  parsing, validation, versions and persistence of a rule set
- :mod:`m3shm.rules.matcher`  a compiled rule set: which rules a series matches, and its plan
- :mod:`m3shm.rules.aggwin`   the C aggregation windows and transforms (imports numpy)

Semantics and the wiring plan: docs/rules.md. Cell layout: docs/formats/aggwin.md.
"""
