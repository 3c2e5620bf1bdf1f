"""Build configuration beyond pyproject.toml: the optional compiled hot paths.

``pcrfs.fuse._fastpath`` (pcrfs/fuse/_fastpath.c) needs a C compiler and Python's
headers (Debian: gcc, libc6-dev, python3-dev) and nothing else: no libfuse or zlib
headers. ``optional=True``: if it cannot be built, pip installs pcrfs without it and
the mount serves every read in Python (its log says so).

``pcrfs.quality._ssimfilter`` (pcrfs/quality/_ssimfilter.c): the SSIM window of the
quality index's scoring, needing the same and no numpy headers (it takes arrays through
the buffer protocol). Without it the scoring filters with BLAS products (slower, and much
slower under OpenBLAS's pre-AVX2 kernels). -ffp-contract=off: the same sums, bit for bit,
whatever the vector width or FMA (the tests compare it with the BLAS path to float tolerance).
"""
from setuptools import Extension, setup

setup(ext_modules=[
    Extension("pcrfs.fuse._fastpath", ["pcrfs/fuse/_fastpath.c"], optional=True,
              extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-variable"], libraries=["dl"]),
    Extension("pcrfs.quality._ssimfilter", ["pcrfs/quality/_ssimfilter.c"], optional=True,
              extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-ffp-contract=off"]),
])
