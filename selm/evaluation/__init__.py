"""Evaluation of models outside the training loop (`selm eval ...`): mtbench.py (two-turn questions
rated 1-10 by an LLM judge), pairwise.py (a model against a baseline, judged head to head; raw and
length-controlled win rates in winrate.py; prompts and answers in outputs.py). Sits at the layer of
selm/studies."""
