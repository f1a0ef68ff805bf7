"""Experiments on top of the framework: code that exists for one benchmark, not for the paper."""
