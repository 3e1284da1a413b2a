"""DAG, scheduling, caching and the CLI of hmc-pgt."""

#: Product version, written into every label row and run record.
__version__ = "0.1.0"
