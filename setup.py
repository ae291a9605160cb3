"""Build entry: setuptools metadata lives in pyproject.toml; this file only wires in the
cffi builder (API / out-of-line mode) that compiles csrc/ into ``m3shm._core``."""

from setuptools import setup

setup(cffi_modules=["csrc/build_ffi.py:ffibuilder"])
