# m3shm -- the two set-up commands are `make run` and `make test` (see README.md).
# Every target creates .venv and installs what it needs; `build` always starts from a clean
# build/ so a flag change can never be hidden by a stale object.

PY      ?= python3.11
VENV    := .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip
STAMP   := $(VENV)/.deps-stamp
ASAN_DIR := build/asan
FUZZ_DIR := build/fuzz
FUZZ_SECONDS ?= 20
ASAN_PRELOAD = $(shell gcc -print-file-name=libasan.so) $(shell gcc -print-file-name=libubsan.so)

.PHONY: run test build venv lint test-py test-asan fuzz clean bench

run: build
	$(VENV)/bin/m3shm serve

test: build lint test-py test-asan fuzz

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q cffi numpy uvloop httptools protobuf python-snappy PyYAML promql-parser zstandard \
	    pytest hypothesis ruff
	touch $(STAMP)

venv: $(STAMP)

build: $(STAMP)
	rm -rf build m3shm/_core.*.so m3shm/_core.c
	$(PIP) install -q --no-build-isolation --no-deps -e .

lint: $(STAMP)
	$(VENV)/bin/ruff check m3shm tests perf csrc/build_ffi.py

test-py: build
	$(VPY) -m pytest -q tests

# The C-level tests again, against a copy of the core built with ASan + UBSan.
test-asan: $(STAMP)
	rm -rf $(ASAN_DIR)
	$(VPY) csrc/build_ffi.py --sanitize --outdir $(ASAN_DIR) > /dev/null
	M3SHM_CORE_LIB="$$(ls $(ASAN_DIR)/m3shm/_core*.so)" \
	LD_PRELOAD="$(ASAN_PRELOAD)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	$(VPY) -m pytest -q -m native -p no:cacheprovider tests

# libFuzzer targets (clang) for every decoder of untrusted bytes, each for FUZZ_SECONDS.
fuzz:
	bash tests/fuzz/run.sh $(FUZZ_DIR) $(FUZZ_SECONDS)

bench: build
	$(VPY) perf/codec.py

clean:
	rm -rf build $(VENV) m3shm/_core.*.so m3shm/_core.c
