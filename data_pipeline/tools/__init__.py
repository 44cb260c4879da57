"""Tooling around the data pipeline (not imported by its stages): the offline demo and benchmarks."""
