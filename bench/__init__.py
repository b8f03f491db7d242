"""Benchmarks (run as modules, e.g. ``python -m bench.bench_kernels``); results go to ``bench/results/``."""
