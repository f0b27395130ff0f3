"""From sampled token ids to text: incremental detokenizing, stop strings, token bytes."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

_REPLACEMENT = "\ufffd"


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode table used by byte-level BPE vocabularies."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


class TokenTexts:
    """The text and raw bytes of single tokens, as OpenAI's logprobs report them."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._special = set(tokenizer.all_special_ids)
        self._cache: dict[int, tuple[str, bytes]] = {}

    def get(self, token_id: int) -> tuple[str, bytes]:
        """``(text, bytes)`` of one token; ``text`` replaces bytes that are not UTF-8."""
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._compute(token_id)
            self._cache[token_id] = hit
        return hit

    def _compute(self, token_id: int) -> tuple[str, bytes]:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        decoder = _byte_decoder()
        if token_id not in self._special and isinstance(piece, str) and piece \
                and all(ch in decoder for ch in piece):
            raw = bytes(decoder[ch] for ch in piece)
        else:  # special tokens, SentencePiece vocabularies
            text = piece if token_id in self._special else self._tokenizer.decode([token_id])
            raw = str(text).encode()
        return raw.decode("utf-8", errors="replace"), raw


class StopTracker:
    """Turns a growing list of token ids into text deltas, honouring stop strings.

    Text that may be the start of a stop string, or an incomplete UTF-8 sequence, is
    held back until the next token decides it. Special tokens (EOS) add no text.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._text = ""
        self._emitted = 0
        self.stopped = False
        """True once a stop string appeared; the text after it is never emitted."""

    def push(self, token_id: int) -> str:
        """Add a token; returns the text that is now safe to show (may be empty)."""
        self._ids.append(token_id)
        self._text = self._tokenizer.decode(
            self._ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            return self._emit(cut)
        return self._emit(len(self._text) - self._held_back())

    def flush(self) -> str:
        """The text still held back, at the end of generation."""
        return "" if self.stopped else self._emit(len(self._text))

    def _emit(self, end: int) -> str:
        if end <= self._emitted:
            return ""
        delta = self._text[self._emitted:end]
        self._emitted = end
        return delta

    def _first_stop(self) -> int | None:
        found = [i for s in self._stop if (i := self._text.find(s, self._emitted)) >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        text = self._text
        end = len(text)
        while end > self._emitted and text[end - 1] == _REPLACEMENT:
            end -= 1  # an incomplete UTF-8 sequence: its next bytes may complete it
        held = len(text) - end
        for stop in self._stop:
            for k in range(min(len(stop) - 1, end - self._emitted), 0, -1):
                if text.endswith(stop[:k], 0, end):
                    held = max(held, len(text) - end + k)
                    break
        return held
