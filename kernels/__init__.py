"""Numba kernels shared by the runtime, the benchmarks and emitted code."""
