"""Benchmarks of a model outside the training loop (`selm eval ...`): mtbench.py (two-turn questions
rated 1-10 by an LLM judge). Sits at the layer of selm/studies."""
