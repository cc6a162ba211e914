"""Reward functions that are wrong in the ways users get them wrong (for test_bad_inputs)."""


def raises(response, record):
    raise KeyError("score")


def out_of_range(response, record):
    return 2.0


def one_argument(response):
    return 1.0


def not_a_number(response, record):
    return "1.0"


NOT_CALLABLE = 3
