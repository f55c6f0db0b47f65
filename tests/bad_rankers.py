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
