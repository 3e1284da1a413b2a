"""Benchmarks of hmc-pgt (run as modules: python -m benchmarks.<name>)."""
