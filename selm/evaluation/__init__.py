"""Evaluation commands (`selm eval ...`): head-to-head judging of two models' outputs."""
