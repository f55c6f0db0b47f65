"""Broken ranker functions for tests/test_bad_input.py (rank.callable: "bad_rankers:NAME")."""


def raises(prompt, responses):
    return [1 / 0 for _ in responses]


def nan(prompt, responses):
    return [float("nan")] + [0.0] * (len(responses) - 1)


def inf(prompt, responses):
    return [float("inf")] + [0.0] * (len(responses) - 1)


def wrong_count(prompt, responses):
    return [0.0] * (len(responses) + 1)


def not_numbers(prompt, responses):
    return "great"


def all_equal(prompt, responses):
    return [0.5] * len(responses)


def numeric_strings(prompt, responses):
    return [str(20 + i) for i in range(len(responses))]


def booleans(prompt, responses):
    return [i == 0 for i in range(len(responses))]


def numpy_and_torch(prompt, responses):
    import numpy as np
    import torch

    return [np.float32(1.5), torch.tensor(2.0)] + [np.int64(3)] * (len(responses) - 2)
