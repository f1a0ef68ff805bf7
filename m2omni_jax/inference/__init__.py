"""Inference: decoding.py (the shared KV-cache decoder), sampling.py (`SamplingParams`),
streaming.py (typed segments, output heads), generator.py (`Generator`)."""
