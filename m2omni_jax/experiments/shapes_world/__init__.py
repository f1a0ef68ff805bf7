"""The built-in shapes world: generator, writers, metrics and its tuning (a benchmark, not the paper)."""
