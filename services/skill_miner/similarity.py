"""How alike two skills are, for deduplication (no I/O here).

``Similarity`` is the seam: a function from one text and many texts to one score each, in
[0, 1] (cosine-like). The miner compares a proposal's "name: description" with each existing
skill's, and merges into the most similar one at or above ``skill_merge_similarity``.

``lexical_similarity`` is the default: the cosine of word and character-trigram counts,
which needs nothing installed. It is high for near-identical wording (a renamed or lightly
reworded skill) and low for paraphrases; an embedding similarity (all-MiniLM-L6-v2, what
``skill_merge_similarity = 0.85`` is tuned for) can be passed in its place. Exact name
matches merge whatever the score, and the prompt asks the LLM to reuse an existing skill's
name when it improves it, which catches most duplicates before any similarity is needed.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from shared.skill_index import named_text
from shared.skill_index import skill_text as shared_skill_text

Similarity = Callable[[str, Sequence[str]], Sequence[float]]
"""``similarity(text, others) -> one score in [0, 1] per other text``."""

_WORD = re.compile(r"[a-z0-9]+")
_SUFFIXES = ("ing", "ed", "es", "s")
_STOP = frozenset(("a", "an", "the", "of", "to", "for", "in", "on", "at", "and", "or", "with",
                   "when", "is", "are", "be", "it", "its", "this", "that", "you", "your", "as",
                   "by", "from"))


skill_text = named_text
"""What deduplication compares: the name's words and the description (what retrieval
compares too)."""
text_of = shared_skill_text


class Encoder(Protocol):
    """What ``embedding_similarity`` needs: texts -> L2-normalised vectors, one row each
    (``shared.skill_index.Embedder`` is one)."""

    def encode(self, texts: Sequence[str]) -> Any: ...


def embedding_similarity(encoder: Encoder) -> Similarity:
    """Cosine similarity of sentence embeddings (negative cosines count as 0). Measured
    with all-MiniLM-L6-v2: a reworded duplicate scores ~0.90, unrelated skills < 0.1."""

    def similarity(text: str, others: Sequence[str]) -> list[float]:
        if not others:
            return []
        vectors = encoder.encode([text, *others])
        return [max(0.0, float(score)) for score in vectors[1:] @ vectors[0]]

    return similarity


def lexical_similarity(text: str, others: Sequence[str]) -> list[float]:
    """Cosine similarity of word and character-trigram counts (see the module docstring)."""
    mine = _features(text)
    return [_cosine(mine, _features(other)) for other in others]


def _stem(word: str) -> str:
    for suffix in _SUFFIXES:
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[:-len(suffix)]
    return word


def _features(text: str) -> Counter[str]:
    words = [_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOP]
    features: Counter[str] = Counter(f"w:{w}" for w in words)
    for word in words:
        padded = f" {word} "
        features.update(f"c:{padded[i:i + 3]}" for i in range(len(padded) - 2))
    return features


def _cosine(a: Counter[str], b: Counter[str]) -> float:
    if not a or not b:
        return 0.0
    dot = sum(count * b[key] for key, count in a.items() if key in b)
    norm = math.sqrt(sum(v * v for v in a.values())) * math.sqrt(sum(v * v for v in b.values()))
    return dot / norm if norm else 0.0
