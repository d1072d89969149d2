"""The sweep (Table 1 and its figures), the benchmark and the README tables.
Run with python -m tools.sweep, python -m tools.bench and python -m tools.tables."""
