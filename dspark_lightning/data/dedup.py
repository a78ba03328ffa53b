"""Prompt de-duplication and the held-out filter: text normalisation, MinHash LSH over word shingles, n-gram overlap.

* :class:`NearDuplicateIndex` finds exact duplicates (the same normalised text) and near duplicates (Jaccard
  similarity of word-shingle sets at least ``threshold``). Candidates come from MinHash locality-sensitive hashing
  (``bands`` bands of ``num_perm / bands`` rows, Broder 1997; Leskovec, Rajaraman & Ullman, *Mining of Massive
  Datasets*, ch. 3) and every candidate is confirmed by its exact Jaccard similarity, so the index never reports a
  pair below the threshold; it may miss a pair just above it with a small probability (about 1 % at 0.7 with the
  defaults).
* :class:`HeldoutFilter` flags a prompt that copies an evaluation prompt: a near duplicate of one (word shingles, or
  the same keywords reworded), a prompt that shares a 13-word n-gram with one (the decontamination rule of GPT-3,
  Brown et al. 2020, appendix C), or one that contains a whole short evaluation prompt. Text found in several
  evaluation prompts is the suites' template ("please reason step by step, and put your final answer within ...")
  and is masked out before comparing, so it is no evidence of a copy. On the shipped suites the train-split prompts
  share nothing with the held-out ones but one pair of sibling MATH problems (tests/data/test_heldout_split.py).

Normalisation: Unicode NFKC, lower case, words are runs of letters and digits (``\\w+``), so spacing, punctuation
and case never hide a copy.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .benchmarks import suite_prompts

_WORD = re.compile(r"\w+")
_PRIME = (1 << 31) - 1  # MinHash permutations h -> (a h + b) mod p; a, b, h < 2^31 keep a h + b inside uint64


STOP_WORDS = frozenset(
    "the and for with from that this these those are was were you your our their its into onto then than there "
    "what which who whom how why when where can could would should will shall may might must has have had not "
    "but any all each some such also only very just about over under more most less".split())
MIN_KEYWORDS = 6  # fewer are too generic to call two texts the same request (math: "let find minimum value xyz")


def words(text: str) -> list[str]:
    """The normalised words of ``text`` (NFKC, lower case, ``\\w+`` runs)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def normalise(text: str) -> str:
    """``text`` as its normalised words joined by single spaces: the key of an exact duplicate."""
    return " ".join(words(text))


def _hash(item: str) -> int:
    return zlib.crc32(item.encode())  # stable across processes (unlike hash()), and cheap


def shingles(tokens: list[str], n: int) -> frozenset[int]:
    """Hashes of the word ``n``-grams of ``tokens`` (the whole sequence as one shingle when shorter than ``n``)."""
    if not tokens:
        return frozenset()
    if len(tokens) < n:
        return frozenset({_hash(" ".join(tokens))})
    return frozenset(_hash(" ".join(tokens[i:i + n])) for i in range(len(tokens) - n + 1))


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclass
class NearDuplicateIndex:
    """Texts seen so far, to find exact and near duplicates of a new one (see the module docstring).

    Args:
        threshold: Jaccard similarity of word-shingle sets at or above which two texts are near duplicates.
        shingle: words per shingle.
        num_perm: MinHash permutations; ``bands`` must divide it.
        bands: LSH bands; more bands catch lower similarities (and cost more candidate checks).
        seed: seed of the MinHash permutations.
    """

    threshold: float = 0.7
    shingle: int = 3
    num_perm: int = 64
    bands: int = 16
    seed: int = 0
    _keys: list[Any] = field(default_factory=list, init=False, repr=False)
    _sets: list[frozenset[int]] = field(default_factory=list, init=False, repr=False)
    _exact: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _buckets: list[dict[bytes, list[int]]] = field(default_factory=list, init=False, repr=False)
    _largest: int = field(default=0, init=False, repr=False)  # shingles of the largest stored set

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold} must be in (0, 1].")
        if self.shingle < 1 or self.bands < 1 or self.num_perm % self.bands:
            raise ValueError(f"shingle={self.shingle} must be >= 1 and bands={self.bands} must divide "
                             f"num_perm={self.num_perm}.")
        rng = np.random.default_rng(self.seed)
        self._a = rng.integers(1, _PRIME, self.num_perm, dtype=np.uint64)
        self._b = rng.integers(0, _PRIME, self.num_perm, dtype=np.uint64)
        self._buckets = [{} for _ in range(self.bands)]

    def __len__(self) -> int:
        return len(self._keys)

    def _signature(self, hashes: frozenset[int]) -> np.ndarray:
        h = np.fromiter(hashes, dtype=np.uint64, count=len(hashes)) % np.uint64(_PRIME)
        return ((self._a[:, None] * h[None, :] + self._b[:, None]) % np.uint64(_PRIME)).min(axis=1)

    def _bands(self, signature: np.ndarray) -> list[bytes]:
        rows = self.num_perm // self.bands
        return [signature[i * rows:(i + 1) * rows].tobytes() for i in range(self.bands)]

    def find(self, text: str) -> Any:
        """The key of a stored text that ``text`` duplicates (exactly or nearly), else None."""
        key, _ = self._lookup(text)
        return key

    def add(self, text: str, key: Any) -> Any:
        """Store ``text`` under ``key`` unless it duplicates a stored text; return that text's key (None if added)."""
        found, prepared = self._lookup(text)
        if found is not None:
            return found
        norm, hashes, bands = prepared
        if bands is None:
            bands = self._bands(self._signature(hashes)) if hashes else []
        self._largest = max(self._largest, len(hashes))
        index = len(self._keys)
        self._keys.append(key)
        self._sets.append(hashes)
        self._exact.setdefault(norm, index)
        for band, bucket in zip(bands, self._buckets):
            bucket.setdefault(band, []).append(index)
        return None

    def _lookup(self, text: str) -> tuple[Any, tuple[str, frozenset[int], list[bytes] | None]]:
        tokens = words(text)
        norm = " ".join(tokens)
        hashes = shingles(tokens, self.shingle)
        if norm in self._exact:
            return self._keys[self._exact[norm]], (norm, hashes, None)
        if len(hashes) * self.threshold > self._largest:  # J(A, B) <= |B| / |A|: no stored text is close enough
            return None, (norm, hashes, None)
        bands = self._bands(self._signature(hashes)) if hashes else []
        seen: set[int] = set()
        for band, bucket in zip(bands, self._buckets):
            for index in bucket.get(band, ()):
                if index not in seen:
                    seen.add(index)
                    if jaccard(hashes, self._sets[index]) >= self.threshold:
                        return self._keys[index], (norm, hashes, bands)
        return None, (norm, hashes, bands)


class HeldoutFilter:
    """Flags prompts that copy a held-out (evaluation) prompt; see the module docstring.

    Both sides are compared on their *content words*: the words left once the held-out suites' template text is
    masked out (every ``template_ngram``-gram found in at least ``boilerplate`` held-out prompts, e.g. "please
    reason step by step, and put your final answer within boxed"), so a shared template never makes two different
    questions look alike and an n-gram never spans a masked stretch.

    Args:
        prompts: ``(name, text)`` of every held-out prompt, e.g. ``("gsm8k:12", "Janet's ducks ...")``.
        ngram: content words of an n-gram whose presence in both texts marks a copy; an n-gram counts only when at
            least half its words hold a letter (runs of numbers, e.g. test-case grids, are no evidence).
        threshold: near-duplicate Jaccard threshold (word 3-gram shingles of the content words).
        keyword_threshold: near-duplicate Jaccard threshold of the keyword sets (content words of 3 characters or
            more, a few stop words left out), for texts of at least :data:`MIN_KEYWORDS` keywords: it catches the
            same request reworded by articles and word order ("remove the first and last occurrence of a given
            character from a string"), which shifts every shingle.
        template_ngram: length of the n-grams that detect template text.
        boilerplate: an n-gram found in at least this many held-out prompts is template text.
        min_contained: a held-out prompt shorter than ``ngram`` words but at least this long marks a copy when a text
            contains all its words in order (template text included: "write a function to sort a list of elements").
    """

    def __init__(self, prompts: Iterable[tuple[str, str]], *, ngram: int = 13, threshold: float = 0.7,
                 keyword_threshold: float = 0.8, template_ngram: int = 6, boilerplate: int = 3,
                 min_contained: int = 6) -> None:
        if ngram < 2 or template_ngram < 2 or boilerplate < 2:
            raise ValueError(f"ngram={ngram}, template_ngram={template_ngram} and boilerplate={boilerplate} must be "
                             f">= 2.")
        self.ngram, self.template_ngram = ngram, template_ngram
        prompts = [(name, words(text)) for name, text in prompts]
        self.size = len(prompts)
        owners: dict[tuple[str, ...], set[str]] = defaultdict(set)
        for name, tokens in prompts:
            for g in _ngrams(tokens, template_ngram):
                owners[g].add(name)
        self.template = {g for g, names in owners.items() if len(names) >= boilerplate}
        self.near = NearDuplicateIndex(threshold=threshold)
        self.keywords = NearDuplicateIndex(threshold=keyword_threshold, shingle=1)
        evidence: dict[tuple[str, ...], str] = {}
        self.short: dict[str, str] = {}  # " <words of a short prompt> " -> name
        for name, tokens in prompts:
            segments = self.content(tokens)
            content = [w for segment in segments for w in segment]
            if not content:
                continue
            self.near.add(" ".join(content), name)
            keys = keywords(content)
            if len(keys) >= MIN_KEYWORDS:
                self.keywords.add(" ".join(keys), name)
            if min_contained <= len(tokens) < ngram:
                self.short.setdefault(f" {' '.join(tokens)} ", name)
            for segment in segments:
                wordy = [int(len(w) >= 3 and any(c.isalpha() for c in w)) for w in segment]
                run = sum(wordy[:ngram])  # words of the window that hold a letter and 3 characters or more
                for i in range(len(segment) - ngram + 1):
                    if i:
                        run += wordy[i + ngram - 1] - wordy[i - 1]
                    if 2 * run >= ngram:  # a run of numbers (a test-case grid) is no evidence
                        evidence.setdefault(tuple(segment[i:i + ngram]), name)
        self.ngrams = evidence

    @classmethod
    def from_suites(cls, suites: Iterable[str], **kwargs: Any) -> HeldoutFilter:
        """Every turn of every row of the given suites (names of shipped suites or JSONL paths)."""
        return cls(suite_prompts(suites), **kwargs)

    def content(self, tokens: list[str]) -> list[list[str]]:
        """``tokens`` less the template text, as the runs of words between masked stretches."""
        n = self.template_ngram
        masked = [False] * len(tokens)
        for i in range(len(tokens) - n + 1):
            if tuple(tokens[i:i + n]) in self.template:
                masked[i:i + n] = [True] * n
        segments, current = [], []
        for word, hidden in zip(tokens, masked):
            if hidden:
                if current:
                    segments.append(current)
                current = []
            else:
                current.append(word)
        return [*segments, current] if current else segments

    def match(self, text: str) -> str | None:
        """The name of a held-out prompt that ``text`` copies (near duplicate, shared n-gram, or contains it)."""
        tokens = words(text)
        segments = self.content(tokens)
        content = [w for segment in segments for w in segment]
        if not content:
            return None
        found = self.near.find(" ".join(content))
        keys = keywords(content)
        if found is None and len(keys) >= MIN_KEYWORDS:
            found = self.keywords.find(" ".join(keys))
        if found is not None:
            return found
        for segment in segments:
            for g in _ngrams(segment, self.ngram):
                if g in self.ngrams:
                    return self.ngrams[g]
        spaced = f" {' '.join(tokens)} "
        return next((name for short, name in self.short.items() if short in spaced), None)


def keywords(tokens: list[str]) -> list[str]:
    """The distinct words of 3 characters or more, stop words left out, sorted (a bag of words as a text)."""
    return sorted({w for w in tokens if len(w) >= 3 and w not in STOP_WORDS})


def _ngrams(tokens: list[str], n: int) -> Iterator[tuple[str, ...]]:
    return (tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
