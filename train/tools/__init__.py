"""Tooling around the trainer (not imported by a training run): benchmarks and the demo."""
