"""Benchmarks: ``python -m fdp.bench [--quick] [--json PATH]``. Ratios come from one run."""
