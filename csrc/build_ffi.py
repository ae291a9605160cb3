"""cffi builder (API / out-of-line mode) for m3shm's C core, ``m3shm._core``.

setup.py names ``ffibuilder`` in ``cffi_modules``; ``pip install .`` and ``pip install -e .``
compile every ``csrc/*.c`` into one extension. The cdef is ``csrc/m3shm.h`` read as it is: that
header is written for cffi (no includes, no conditionals), so C files include <stdint.h> and
<stddef.h> before it.

Build flavours, chosen by environment variables (read at build time):
  M3SHM_SANITIZE=1  -O1 -g with AddressSanitizer + UndefinedBehaviorSanitizer and M3_DEBUG
  M3SHM_DEBUG=1     -O0 -g with M3_DEBUG invariant checks
  default           -O2 release build

Run directly to build a separate copy (used by `make test` for the sanitizer run):
  python csrc/build_ffi.py --sanitize --outdir build/asan
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
HEADER = HERE / "m3shm.h"

RELEASE_FLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                 "-D_GNU_SOURCE", "-fvisibility=hidden"]
DEBUG_FLAGS = ["-std=c11", "-O0", "-g", "-Wall", "-Wextra", "-Wno-unused-parameter",
               "-D_GNU_SOURCE", "-DM3_DEBUG=1"]
SANITIZE_FLAGS = ["-std=c11", "-O1", "-g", "-fno-omit-frame-pointer", "-Wall", "-Wextra",
                  "-Wno-unused-parameter", "-D_GNU_SOURCE", "-DM3_DEBUG=1",
                  "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]


def _sources(absolute: bool) -> list[str]:
    # setuptools wants paths relative to the project (it refuses absolute ones in some modes);
    # FFI.compile(tmpdir=...) compiles from inside tmpdir and needs absolute ones.
    paths = sorted(HERE.glob("*.c"))
    return [str(p if absolute else p.relative_to(HERE.parent)) for p in paths]


def make_builder(flavour: str, absolute: bool = False) -> FFI:
    if flavour == "sanitize":
        cflags, ldflags = SANITIZE_FLAGS, ["-fsanitize=address,undefined"]
    elif flavour == "debug":
        cflags, ldflags = DEBUG_FLAGS, []
    else:
        cflags, ldflags = RELEASE_FLAGS, []
    ffi = FFI()
    ffi.cdef(HEADER.read_text())
    ffi.set_source(
        "m3shm._core",
        "#include <stdint.h>\n#include <stddef.h>\n#include \"m3shm.h\"\n",
        sources=_sources(absolute),
        include_dirs=[str(HERE)],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        libraries=["m"],
    )
    return ffi


def _flavour_from_env() -> str:
    if os.environ.get("M3SHM_SANITIZE") == "1":
        return "sanitize"
    if os.environ.get("M3SHM_DEBUG") == "1":
        return "debug"
    return "release"


ffibuilder = make_builder(_flavour_from_env())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sanitize", action="store_true", help="ASan+UBSan build")
    ap.add_argument("--debug", action="store_true", help="-O0 build with invariant checks")
    ap.add_argument("--outdir", default="build/ext", help="where the .so goes")
    args = ap.parse_args()
    flavour = "sanitize" if args.sanitize else "debug" if args.debug else "release"
    os.chdir(HERE.parent)
    out = make_builder(flavour, absolute=True).compile(tmpdir=args.outdir, verbose=False)
    print(out)
