"""Benchmarks that print figures; run them as modules from the repository root.

Results and commands: docs/performance.md.
"""
