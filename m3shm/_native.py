"""Loads the C core (``m3shm._core``, built by cffi from csrc/) and exposes ``ffi`` and ``lib``.

``M3SHM_CORE_LIB=/path/to/_core.so`` loads another build of the same core instead, e.g. the
AddressSanitizer build that ``make test-asan`` runs the native tests against.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any


def _load() -> Any:
    path = os.environ.get("M3SHM_CORE_LIB")
    if not path:
        from m3shm import _core

        return _core
    spec = importlib.util.spec_from_file_location("m3shm._core", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"M3SHM_CORE_LIB={path!r} is not a loadable extension module")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_core = _load()
ffi = _core.ffi
lib = _core.lib
