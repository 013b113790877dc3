"""Benchmarks: each prints the exact command, the machine and its figures (see RESULTS.md)."""
