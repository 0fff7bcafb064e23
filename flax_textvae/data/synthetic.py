"""A small probabilistic English-like grammar, so demos and tests can train with no download.

Sentences are lower-cased words without punctuation (the PTB convention), built from subjects, verbs,
objects, adjectives, adverbs, prepositional phrases, relative clauses and clause coordination. Lengths run
from 4 to 30 words (mean about 15, a spread like PTB's bulk), and the vocabulary is about 120 words, so a
word-level tokenizer with ``vocab_size=128`` covers it. The output is a pure function of ``(n, seed)``.
"""

from __future__ import annotations

import random

MIN_WORDS = 4
MAX_WORDS = 30

_DET_SG = ("the", "a", "this", "every", "one")
_DET_PL = ("the", "some", "many", "these", "two", "few")
_NOUNS = (
    "dog",
    "cat",
    "bird",
    "man",
    "woman",
    "child",
    "teacher",
    "doctor",
    "farmer",
    "student",
    "company",
    "city",
    "house",
    "river",
    "car",
    "book",
    "letter",
    "market",
    "garden",
    "road",
)
_ADJS = (
    "big",
    "small",
    "old",
    "young",
    "red",
    "green",
    "happy",
    "quiet",
    "strange",
    "busy",
    "tired",
    "new",
    "bright",
    "dark",
)
_VERBS_T = (
    "saw",
    "liked",
    "found",
    "followed",
    "helped",
    "watched",
    "bought",
    "sold",
    "visited",
    "called",
    "built",
    "painted",
)
_VERBS_I = ("slept", "laughed", "arrived", "left", "waited", "worked", "smiled", "ran", "stayed", "fell")
_ADVS = ("quickly", "slowly", "often", "rarely", "again", "today", "yesterday", "quietly")
_PREPS = ("near", "in", "on", "behind", "under", "with", "beside", "across")
_CONJ = ("and", "but", "because", "while", "although", "so")
_NAMES = ("john", "mary", "alice", "bob")


def _plural(noun: str) -> str:
    if noun.endswith(("ch", "s")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun == "man":
        return "men"
    if noun == "woman":
        return "women"
    if noun == "child":
        return "children"
    return noun + "s"


class _Grammar:
    """Recursive generator; ``depth`` limits nesting of PPs and relative clauses."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def pick(self, words: tuple[str, ...]) -> str:
        return self.rng.choice(words)

    def noun_phrase(self, depth: int) -> list[str]:
        if self.chance(0.08):
            return [self.pick(_NAMES)]
        plural = self.chance(0.3)
        words = [self.pick(_DET_PL if plural else _DET_SG)]
        for _ in range(2):
            if self.chance(0.35):
                words.append(self.pick(_ADJS))
        noun = self.pick(_NOUNS)
        words.append(_plural(noun) if plural else noun)
        if words[0] == "a" and words[1][0] in "aeiou":
            words[0] = "an"
        if depth > 0 and self.chance(0.25):
            words += self.prep_phrase(depth - 1)
        if depth > 0 and self.chance(0.2):
            words += self.relative_clause(depth - 1)
        return words

    def prep_phrase(self, depth: int) -> list[str]:
        return [self.pick(_PREPS)] + self.noun_phrase(depth)

    def relative_clause(self, depth: int) -> list[str]:
        if self.chance(0.5):
            return ["that"] + self.verb_phrase(depth)
        return ["that"] + self.noun_phrase(0) + [self.pick(_VERBS_T)]

    def verb_phrase(self, depth: int) -> list[str]:
        words = []
        if self.chance(0.15):
            words.append(self.pick(_ADVS))
        if self.chance(0.6):
            words += [self.pick(_VERBS_T)] + self.noun_phrase(depth)
        else:
            words.append(self.pick(_VERBS_I))
        if depth > 0 and self.chance(0.35):
            words += self.prep_phrase(depth - 1)
        if self.chance(0.2):
            words.append(self.pick(_ADVS))
        return words

    def clause(self, depth: int) -> list[str]:
        return self.noun_phrase(depth) + self.verb_phrase(depth)

    def sentence(self) -> list[str]:
        words = self.clause(2)
        while self.chance(0.4) and len(words) < 20:
            words += [self.pick(_CONJ)] + self.clause(1)
        return words


def synthetic_sentences(n: int, seed: int = 0) -> list[str]:
    """Samples ``n`` sentences from the grammar.

    Args:
      n: number of sentences.
      seed: random seed; the same ``(n, seed)`` always gives the same list, and the first ``m``
        sentences of ``synthetic_sentences(n, s)`` equal ``synthetic_sentences(m, s)``.

    Returns:
      ``n`` strings of 4-30 space-separated lower-case words.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"flax_textvae.synthetic:{seed}")
    grammar = _Grammar(rng)
    out: list[str] = []
    while len(out) < n:
        words = grammar.sentence()
        if MIN_WORDS <= len(words) <= MAX_WORDS:
            out.append(" ".join(words))
    return out


def synthetic_vocabulary() -> list[str]:
    """Every word the grammar can produce (sorted)."""
    words = set(_DET_SG + _DET_PL + _ADJS + _VERBS_T + _VERBS_I + _ADVS + _PREPS + _CONJ + _NAMES + ("that", "an"))
    words.update(_NOUNS)
    words.update(_plural(w) for w in _NOUNS)
    return sorted(words)
