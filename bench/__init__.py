"""Throughput benchmarks (``make bench``); see ``bench/bench.py``."""
