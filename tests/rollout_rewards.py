"""A reward for rollout tests: varies between random responses, so that advantages (and hence
updates) are not zero from the first RL step on."""


def char_parity(response: str, record: dict) -> float:
    return float(sum(map(ord, response)) % 2)
