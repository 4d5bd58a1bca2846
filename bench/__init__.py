"""Benchmarks. Run them all with ``python -m bench`` (or ``make bench``); see README.md."""
