"""Build configuration beyond pyproject.toml: the mount's optional compiled hot path.

``pcrfs.fuse._fastpath`` (pcrfs/fuse/_fastpath.c) needs a C compiler and Python's
headers (Debian: gcc, libc6-dev, python3-dev) and nothing else: no libfuse or zlib
headers. ``optional=True``: if it cannot be built, pip installs pcrfs without it and
the mount serves every read in Python (its log says so).
"""
from setuptools import Extension, setup

setup(ext_modules=[
    Extension("pcrfs.fuse._fastpath", ["pcrfs/fuse/_fastpath.c"], optional=True,
              extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-variable"], libraries=["dl"]),
])
