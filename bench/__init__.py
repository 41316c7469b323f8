"""Benchmarks for herd_trio: `python -m bench` (or `nox -s bench`).

The suite starts the default herd as real server processes, drives it from a separate
load-generator process over loopback and, in the same run, measures a minimal trio
"limit" server (`bench.limit`) with the same generator, so every figure is also given as
a ratio to what trio itself costs on this machine. See docs/performance.md.
"""
