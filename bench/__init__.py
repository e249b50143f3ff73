"""The benchmarks (docs/PERFORMANCE.md), run as modules from the repository root:
``.venv/bin/python -m bench.bench_queue [--smoke]``."""
