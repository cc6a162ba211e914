"""Local haystack text and needle values for the RULER-style generators.

Nothing here reads a file or the network: the "essay" haystack is generated from a small grammar
(RULER uses Paul Graham essays, which cannot be shipped or downloaded here), the "noise" haystack
repeats a few plain sentences, and needle keys and values are drawn from word lists, digits and
UUIDs. Everything is a pure function of a ``random.Random`` so generation is reproducible.

Invariants the generators rely on (checked in ``check_word_lists`` and by the tests):

- Haystack text contains no digits, no hyphens and no run of two capital letters, so number, UUID,
  ``adjective-noun`` and ``VAR NAME`` needles can never occur in it by accident.
- ``ADJECTIVES`` is suffix-free and ``NOUNS`` prefix-free, so no ``adjective-noun`` key is a
  substring of another; pseudo-words of one length are never substrings of each other. Together
  these make every needle value appear exactly once in a context and keep substring scoring exact.
"""

from __future__ import annotations

import random
import uuid
from typing import Callable, Iterator

ADJECTIVES = (
    "able", "acid", "agile", "alert", "amber", "ample", "angry", "arctic", "awake", "azure",
    "bald", "basic", "blank", "blunt", "bold", "brave", "brief", "brisk", "broken", "bumpy",
    "calm", "candid", "cheap", "chilly", "civic", "clean", "clever", "cloudy", "coarse", "cosmic",
    "cozy", "crisp", "cubic", "curly", "damp", "dark", "dense", "dizzy", "dry", "dusty",
    "eager", "early", "elegant", "empty", "exotic", "faint", "fancy", "fast", "feeble", "fierce",
    "firm", "fluffy", "fond", "frozen", "funny", "fuzzy", "gentle", "giant", "glad", "glossy",
    "golden", "grand", "gray", "greedy", "gusty", "handy", "happy", "hasty", "hollow", "honest",
    "humble", "husky", "ivory", "idle", "jolly", "juicy", "keen", "kind", "lazy", "loyal",
    "little", "lively", "lofty", "loud", "lucky", "lunar", "magic", "merry", "mild", "misty",
    "modest", "muddy", "narrow", "neat", "nimble", "noble", "noisy", "odd", "orange", "pale",
    "perfect", "plain", "polite", "proud", "purple", "quick", "quiet", "rapid", "rare", "rigid",
    "ripe", "robust", "rough", "royal", "rusty", "sandy", "savage", "shaggy", "shiny", "silent",
    "silly", "sleek", "slim", "smooth", "snowy", "solar", "solid", "spicy", "steady", "sticky",
    "stormy", "sunny", "swift", "tidy", "tiny", "tough", "upbeat", "urban", "vast", "vivid",
    "warm", "weary", "wild", "windy", "wise", "witty", "wooden", "young", "zany", "zealous",
)

NOUNS = (
    "acorn", "anchor", "apple", "arrow", "badge", "bagel", "ballad", "banjo", "barrel", "beacon",
    "beetle", "blanket", "bottle", "bridge", "bucket", "cabin", "cactus", "camel", "candle", "canyon",
    "carpet", "castle", "cello", "chimney", "cider", "circus", "clock", "cobra", "comet", "compass",
    "coyote", "crayon", "dagger", "desert", "diamond", "dolphin", "donkey", "dragon", "drum", "eagle",
    "easel", "ember", "engine", "falcon", "feather", "fiddle", "forest", "fossil", "fountain", "gadget",
    "garden", "giraffe", "glacier", "goblet", "gravel", "guitar", "hammer", "harbor", "helmet", "hockey",
    "igloo", "island", "jacket", "jigsaw", "jungle", "kettle", "kitten", "ladder", "lagoon", "lantern",
    "lemon", "lizard", "lobster", "magnet", "mango", "marble", "meadow", "mirror", "monkey", "mosaic",
    "mustard", "napkin", "needle", "nugget", "oasis", "octopus", "orchid", "otter", "paddle", "parrot",
    "peanut", "pebble", "pencil", "pepper", "piano", "pigeon", "planet", "pocket", "puzzle", "quilt",
    "rabbit", "radish", "raven", "ribbon", "rocket", "saddle", "salmon", "sandal", "scarf", "shovel",
    "spider", "sponge", "squid", "statue", "sundial", "tablet", "teapot", "thimble", "tiger", "tomato",
    "trumpet", "tulip", "turtle", "umbrella", "valley", "velvet", "violin", "volcano", "wagon", "walnut",
    "whistle", "willow", "window", "wizard", "yogurt", "zebra", "zipper",
)

# Syllables for pseudo-words ("bakomi"): consonant + vowel, 14 x 5 = 70 syllables.
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
SYLLABLES = tuple(c + v for c in _CONSONANTS for v in _VOWELS)

# The noise haystack: a fixed cycle of plain sentences (RULER repeats its own five sentences).
NOISE_SENTENCES = (
    "The wind moves over the field.",
    "The lake is still.",
    "The road goes on and on.",
    "Birds rest on the old fence.",
    "Night comes slowly.",
)

# --- essay grammar -------------------------------------------------------------------------------
_SUBJECTS = (
    "the committee", "a young engineer", "the old librarian", "our small team", "the city council",
    "every careful reader", "the first settlers", "a quiet teacher", "the night watchman", "my neighbor",
    "the research group", "a tired traveler", "the museum guide", "the local baker", "an honest critic",
    "the village elders", "a patient gardener", "the ship captain", "the young painter", "the new manager",
    "most historians", "the students", "a curious child", "the harbor pilot", "the town doctor",
)
_VERBS_PAST = (
    "questioned", "described", "rebuilt", "studied", "ignored", "praised", "measured", "collected",
    "explained", "imagined", "repaired", "defended", "revisited", "compared", "translated", "organized",
    "doubted", "celebrated", "discovered", "abandoned", "protected", "mapped", "recorded", "shared",
)
_VERBS_BASE = (
    "question", "describe", "rebuild", "study", "ignore", "praise", "measure", "collect", "explain",
    "imagine", "repair", "defend", "revisit", "compare", "translate", "organize", "doubt", "share",
)
_OBJECTS = (
    "the early drafts", "an unfinished bridge", "the rules of the game", "a forgotten letter",
    "the northern road", "the value of patience", "a simple idea", "the price of bread",
    "the history of the valley", "the lessons of the flood", "an old map", "the habits of the river",
    "the shape of the coast", "a long argument", "the cost of the war", "the meaning of the song",
    "the quiet garden", "a better method", "the plans for the school", "the color of the sky",
    "the voices in the hall", "a difficult question", "the last chapter", "the weight of the stone",
)
_ADVERBIALS = (
    "with unusual care", "before the winter", "for many years", "without much help", "in the morning",
    "after the long meeting", "with great patience", "in a few weeks", "at the end of the season",
    "during the storm", "with some reluctance", "for the second time", "in spite of the rain",
    "without a word", "as the light faded", "at the market", "before anyone noticed", "once again",
)
_CONNECTIVES = (
    "However,", "In the end,", "For a long time,", "Still,", "As a result,", "Later,", "At first,",
    "In practice,", "Even so,", "Meanwhile,", "Of course,", "Years later,",
)
_EVALUATIONS = ("clear", "strange", "likely", "true", "obvious", "surprising", "fair to say", "worth noting")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _essay_sentence(rng: random.Random) -> str:
    s, v, o, a = rng.choice(_SUBJECTS), rng.choice(_VERBS_PAST), rng.choice(_OBJECTS), rng.choice(_ADVERBIALS)
    s2, v2, o2 = rng.choice(_SUBJECTS), rng.choice(_VERBS_PAST), rng.choice(_OBJECTS)
    form = rng.randrange(8)
    if form == 0:
        return f"{rng.choice(_CONNECTIVES)} {s} {v} {o} {a}."
    if form == 1:
        return f"{_cap(s)} {v} {o}, and {s2} {v2} {o2}."
    if form == 2:
        return f"{_cap(s)} {v} {o} because {s2} {v2} {o2}."
    if form == 3:
        return f"It is {rng.choice(_EVALUATIONS)} that {s} {v} {o} {a}."
    if form == 4:
        return f"{_cap(s)} would never {rng.choice(_VERBS_BASE)} {o} {a}."
    if form == 5:
        return f"Few people {rng.choice(_VERBS_BASE)} {o} the way {s} did."
    if form == 6:
        return f"When {s} {v} {o}, {s2} {v2} {o2}."
    return f"{_cap(s)} {v} {o}."


def essay_sentences(rng: random.Random) -> Iterator[str]:
    """An endless stream of essay-like sentences (ASCII, no digits, hyphens or capital runs)."""
    while True:
        yield _essay_sentence(rng)


def essay_words(rng: random.Random) -> Iterator[str]:
    """The essay stream split into words; a word ending in "." closes a sentence."""
    for sentence in essay_sentences(rng):
        yield from sentence.split(" ")


def noise_sentences() -> Iterator[str]:
    """The noise haystack: ``NOISE_SENTENCES`` repeated forever."""
    while True:
        yield from NOISE_SENTENCES


class Stream:
    """A lazily extended list over an iterator, so that ``stream[:n]`` is stable as ``n`` grows."""

    def __init__(self, source: Iterator[str]) -> None:
        self._source = source
        self.items: list[str] = []

    def take(self, n: int) -> list[str]:
        while len(self.items) < n:
            self.items.append(next(self._source))
        return self.items[:n]


# --- needle values --------------------------------------------------------------------------------


def word_key(rng: random.Random) -> str:
    """An ``adjective-noun`` key such as ``brave-lantern``."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def number_value(rng: random.Random, digits: int) -> str:
    """A ``digits``-digit number without a leading zero."""
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def uuid_value(rng: random.Random) -> str:
    """A random (version 4) UUID drawn from ``rng``, so it is reproducible."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def pseudo_word(rng: random.Random, syllables: int = 3) -> str:
    """A pronounceable made-up word such as ``bakomi``."""
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables))


def variable_name(rng: random.Random, letters: int = 5) -> str:
    """An upper-case variable name such as ``QWXPT``."""
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(letters))


class UniqueDraw:
    """Draw values that are all distinct across every draw sharing this object's ``used`` set."""

    def __init__(self, rng: random.Random, used: set[str] | None = None) -> None:
        self.rng = rng
        # Pass another draw's ``used`` set to stay distinct from it while drawing from another rng.
        self.used: set[str] = set() if used is None else used

    def draw(self, make: Callable[[random.Random], str]) -> str:
        for _ in range(10_000):
            value = make(self.rng)
            if value not in self.used:
                self.used.add(value)
                return value
        raise RuntimeError("ran out of distinct values; the value space is too small for this length")


def check_word_lists() -> None:
    """Assert the invariants in the module docstring (cheap; run by the tests)."""
    for words, name in ((ADJECTIVES, "ADJECTIVES"), (NOUNS, "NOUNS")):
        assert len(set(words)) == len(words), f"{name} has duplicates"
        assert all(w.isascii() and w.isalpha() and w.islower() for w in words), f"{name}: lowercase ASCII only"
    for a in ADJECTIVES:
        for b in ADJECTIVES:
            assert a == b or not b.endswith(a), f"ADJECTIVES not suffix-free: {a!r} ends {b!r}"
    for a in NOUNS:
        for b in NOUNS:
            assert a == b or not b.startswith(a), f"NOUNS not prefix-free: {a!r} starts {b!r}"
