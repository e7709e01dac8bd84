"""The feature catalog: what a feature means (GetFeature) and which features match a text or
promote a token (SearchFeatures).

Owns: finding each dictionary's metadata file, loading it lazily, validating feature
references against the loaded dictionaries, building domain ``Feature`` records, and the
text-search scoring. Imports no torch: weight-derived numbers come from the engine
(``Engine.feature_logits`` / ``Engine.token_promoters``). Caching is the caller's business
(the servicer caches serialised responses through ``cache.py``).

Metadata files (``features.npz``; format, writer and reader in ``dictionaries.features_npz``)
are found through the catalog entry's ``metadata`` field, else as ``features.npz`` beside the
dictionary's weights. A missing or mismatched file (feature count differs from ``d_sae``) is
logged and the dictionary is served weights-only.

Weights-only features (no metadata file): ``top_logits``/``bottom_logits`` are computed from
the decoder row through ``ln_final.w`` and ``W_U`` (for transcoders the decoder row already
lives in the residual stream); ``label`` is "" (no evidence to derive one from), ``density``
and ``max_activation`` are 0 and there are no ``top_examples``. Text search finds nothing in
such a dictionary; token search works on every dictionary.

Text search score (per feature, higher is better, only scores > 0 are returned):
    2 × [the whole query is a substring of the label]
    + the fraction of the query's words that are substrings of the label
    + the mean over query words of the word's context score, where a word's context score is
      the mean over the feature's stored top examples of (the feature's largest activation on
      a token that spells the word, as one token with or without a leading space, any case)
      / (the feature's max activation), so 1 means "the word is where it fires hardest".
    Case-insensitive; words are ``\\w+`` runs. Ties keep feature order. The score is a
    ranking aid, not a probability; it is comparable across dictionaries.
Token search score: the direct logit effect on the token per unit feature activation,
``W_dec[i] · (ln_final.w ⊙ W_U[:, token_id])``; across dictionaries the raw values are merged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featuresteer_server import domain
from featuresteer_server.dictionaries import features_npz
from featuresteer_server.errors import (
    FailedPrecondition,
    InvalidArgument,
    feature_dictionary,
    pinned_dictionary,
)

if TYPE_CHECKING:
    from featuresteer_server.config import Config
    from featuresteer_server.engines.base import Engine

log = logging.getLogger(__name__)

METADATA_FILENAME = features_npz.FILENAME
_WORD = re.compile(r"\w+")


class FeatureMetadata:
    """One dictionary's ``features.npz``, read on first use (thread-safe) and kept in memory.

    The file is ``np.savez_compressed`` output, so it cannot be memory-mapped; each array is
    decompressed once. Labels are lower-cased once for search.
    """

    def __init__(self, path: Path, d_sae: int) -> None:
        self.path = path
        self.d_sae = d_sae
        self._arrays: dict[str, np.ndarray] | None = None
        self._lock = threading.Lock()

    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            with self._lock:
                if self._arrays is None:
                    self._arrays = self._read()
        return self._arrays

    def _read(self) -> dict[str, np.ndarray]:
        out = features_npz.read(self.path, self.d_sae)
        # search-ready views, built once: lower-cased labels and an inverted index of the
        # context tokens (flat [F, N, W] positions sorted by token id, padding left out)
        out["labels_lower"] = np.array([str(x).lower() for x in out["labels"]], dtype=object)
        tokens, top_len = out["top_tokens"], out["top_len"]
        valid = np.arange(tokens.shape[2])[None, None, :] < top_len[:, :, None]  # [F, N, W]
        positions = np.flatnonzero(valid)
        token_at = tokens.reshape(-1)[positions]
        order = np.argsort(token_at, kind="stable")
        out["search_index_tokens"] = token_at[order]
        out["search_index_positions"] = positions[order]
        out["search_n_examples"] = np.maximum((top_len > 0).sum(1), 1)
        out["search_max_act"] = np.maximum(out["max_activation"].astype(np.float32), 1e-12)
        return out


@dataclass(frozen=True)
class _Scope:
    """The dictionaries one search covers and the fingerprint its cache key uses."""

    dictionaries: tuple[domain.DictionaryInfo, ...]
    fingerprint: str


class FeatureCatalog:
    """GetFeature / SearchFeatures over the engine's loaded dictionaries."""

    def __init__(
        self,
        engine: Engine,
        metadata_paths: Mapping[str, Path] | None = None,
        *,
        logits_k: int = 10,
    ) -> None:
        self.engine = engine
        self.logits_k = logits_k
        self.dictionaries: dict[str, domain.DictionaryInfo] = {
            d.id: d for d in engine.info().dictionaries
        }
        self.metadata: dict[str, FeatureMetadata] = {}
        for d in self.dictionaries.values():
            path = (metadata_paths or {}).get(d.id)
            if path is None and d.source:
                beside = Path(d.source) / METADATA_FILENAME
                path = beside if beside.is_file() else None
            if path is None:
                continue
            if not Path(path).is_file():
                log.warning("%s: metadata file %s is missing; serving weights-only", d.id, path)
                continue
            self.metadata[d.id] = FeatureMetadata(Path(path), d.d_sae)

    @classmethod
    def from_config(cls, engine: Engine, config: Config) -> FeatureCatalog:
        """Metadata paths from the catalog file's entries (``"metadata"``), when there is one."""
        paths: dict[str, Path] = {}
        if config.catalog is not None and Path(config.catalog).is_file():
            from featuresteer_server.dictionaries import load_catalog

            for entry in load_catalog(Path(config.catalog)):
                if entry.metadata is not None:
                    paths[entry.id] = entry.metadata
        return cls(engine, paths, logits_k=config.feature_logits_k)

    def label(self, ref: domain.FeatureRef) -> str:
        """The feature's catalog label; "" when its dictionary has no metadata."""
        meta = self.metadata.get(ref.dictionary_id)
        if meta is None or not 0 <= ref.index < meta.d_sae:
            return ""
        return str(meta.arrays()["labels"][ref.index])

    def label_graph(self, result: domain.AttributionResult) -> domain.AttributionResult:
        """The same result with every FEATURE node labelled from the catalog."""
        nodes = tuple(
            replace(n, label=self.label(n.feature)) if n.feature is not None else n
            for n in result.nodes
        )
        return replace(result, nodes=nodes)

    # -- validation (cheap, on the event loop, before any cache lookup)
    def dictionary(
        self, dictionary_id: str, field: str, fingerprint: str | None = None
    ) -> domain.DictionaryInfo:
        return pinned_dictionary(self.dictionaries, dictionary_id, field, fingerprint)

    def resolve(self, ref: domain.FeatureRef, field: str = "feature") -> domain.DictionaryInfo:
        """The feature's dictionary; NOT_FOUND / FAILED_PRECONDITION / INVALID_ARGUMENT."""
        return feature_dictionary(
            self.dictionaries, ref.dictionary_id, ref.index, ref.fingerprint, field
        )

    def search_scope(self, req: domain.SearchRequest) -> _Scope:
        if req.token_id is not None:
            vocab = self.engine.tokenizer.vocab_size
            if not 0 <= req.token_id < vocab:
                raise InvalidArgument("token_id", f"{req.token_id} outside [0, {vocab})")
        if req.dictionary_id:
            d = self.dictionary(req.dictionary_id, "dictionary_id")
            return _Scope((d,), d.fingerprint)
        dicts = tuple(self.dictionaries.values())
        if not dicts:
            raise FailedPrecondition("dictionary_id: no dictionary is loaded")
        if len(dicts) == 1:
            return _Scope(dicts, dicts[0].fingerprint)
        import hashlib

        joined = ",".join(sorted(f"{d.id}={d.fingerprint}" for d in dicts))
        return _Scope(dicts, "all-" + hashlib.sha256(joined.encode()).hexdigest()[:16])

    def has_metadata(self, dictionary_id: str) -> bool:
        return dictionary_id in self.metadata

    async def _arrays(self, dictionary_id: str) -> dict[str, np.ndarray] | None:
        meta = self.metadata.get(dictionary_id)
        if meta is None:
            return None
        try:
            return await asyncio.to_thread(meta.arrays)
        except (OSError, ValueError) as exc:
            log.error("%s: unusable metadata (%s); serving weights-only", dictionary_id, exc)
            self.metadata.pop(dictionary_id, None)
            return None

    # -- GetFeature
    async def get_feature(self, ref: domain.FeatureRef) -> domain.Feature:
        d = self.resolve(ref)
        canonical = domain.FeatureRef(d.id, ref.index, d.fingerprint)
        arrays = await self._arrays(d.id)
        if arrays is None:
            top, bottom = await self.engine.feature_logits(d.id, ref.index, self.logits_k)
            return await asyncio.to_thread(self._weights_only, canonical, top, bottom)
        return await asyncio.to_thread(self._from_metadata, canonical, arrays)

    def _token_values(self, pairs: Any) -> tuple[domain.TokenValue, ...]:
        ids = [int(i) for i, _ in pairs]
        tokens = self.engine.tokenizer.tokens(ids)
        return tuple(
            domain.TokenValue(t, float(v)) for t, (_, v) in zip(tokens, pairs, strict=True)
        )

    def _weights_only(
        self,
        ref: domain.FeatureRef,
        top: tuple[tuple[int, float], ...],
        bottom: tuple[tuple[int, float], ...],
    ) -> domain.Feature:
        return domain.Feature(
            feature=ref,
            top_logits=self._token_values(top),
            bottom_logits=self._token_values(bottom),
        )

    def _from_metadata(self, ref: domain.FeatureRef, a: dict[str, np.ndarray]) -> domain.Feature:
        f = ref.index
        examples = []
        for j, n in enumerate(a["top_len"][f].tolist()):  # sorted by max activation, descending
            if n <= 0:
                continue
            ids = [int(t) for t in a["top_tokens"][f, j, :n]]
            acts = tuple(float(x) for x in a["top_acts"][f, j, :n].astype(np.float32))
            examples.append(domain.FeatureExample(tuple(self.engine.tokenizer.tokens(ids)), acts))
        k = self.logits_k

        def pairs(name: str) -> list[tuple[int, float]]:
            ids = a[f"logit_{name}_ids"][f, :k].tolist()
            vals = a[f"logit_{name}_vals"][f, :k].astype(np.float32).tolist()
            return list(zip(ids, vals, strict=True))

        return domain.Feature(
            feature=ref,
            label=str(a["labels"][f]),
            density=float(a["density"][f]),
            max_activation=float(a["max_activation"][f]),
            top_examples=tuple(examples),
            top_logits=self._token_values(pairs("top")),
            bottom_logits=self._token_values(pairs("bottom")),
        )

    # -- SearchFeatures
    async def search(self, req: domain.SearchRequest) -> domain.SearchResult:
        scope = self.search_scope(req)
        scored: list[tuple[float, domain.FeatureRef, str]] = []
        phrase = (req.query or "").strip().lower()
        terms = [(w, self._word_token_ids(w)) for w in _WORD.findall(phrase)]
        for d in scope.dictionaries:
            arrays = await self._arrays(d.id)
            if req.token_id is not None:
                rows = await self.engine.token_promoters(d.id, req.token_id, req.limit)
                for index, score in rows:
                    label = str(arrays["labels"][index]) if arrays is not None else ""
                    scored.append((score, domain.FeatureRef(d.id, index, d.fingerprint), label))
            elif arrays is not None:
                found = await asyncio.to_thread(_text_scores, arrays, phrase, terms)
                for index, score in found[: req.limit]:
                    label = str(arrays["labels"][index])
                    scored.append((score, domain.FeatureRef(d.id, index, d.fingerprint), label))
        scored.sort(key=lambda s: -s[0])  # stable: dictionary order, then feature order
        return domain.SearchResult(
            tuple(domain.FeatureMatch(ref, label, s) for s, ref, label in scored[: req.limit])
        )

    def _word_token_ids(self, word: str) -> list[int]:
        """Ids of single tokens that spell ``word`` (with or without a leading space, as
        written, lower case or capitalised)."""
        ids: set[int] = set()
        for form in {word, word.lower(), word.capitalize()}:
            for text in (form, " " + form):
                enc = self.engine.tokenizer.encode(text, prepend_bos=False)
                if len(enc) == 1:
                    ids.add(int(enc[0]))
        return sorted(ids)


def _contains(labels: np.ndarray, text: str) -> np.ndarray:
    """[F] bool: which (lower-cased) labels contain ``text``."""
    return np.fromiter((text in label for label in labels), dtype=bool, count=labels.shape[0])


def _text_scores(
    a: dict[str, np.ndarray], phrase: str, terms: list[tuple[str, list[int]]]
) -> list[tuple[int, float]]:
    """Features of one dictionary matching a lower-cased query, best first: 2 for the whole
    phrase in the label, plus (per word, averaged) 1 for the word in the label and up to 1 for
    how strongly the feature fires on that word in its top contexts. ``terms``: each word of
    the phrase with the token ids that spell it."""
    labels = a["labels_lower"]  # [F] str
    score = 2.0 * _contains(labels, phrase)  # [F]
    if terms:
        in_label = np.zeros(labels.shape[0])
        ctx = np.zeros(labels.shape[0])
        n_feat, n_ex, width = a["top_tokens"].shape
        index_tokens, index_pos = a["search_index_tokens"], a["search_index_positions"]
        acts = a["top_acts"].reshape(-1)
        for w, ids in terms:
            in_label += _contains(labels, w)
            lo = np.searchsorted(index_tokens, ids, side="left")
            hi = np.searchsorted(index_tokens, ids, side="right")
            spans = [index_pos[i:j] for i, j in zip(lo, hi, strict=True) if j > i]
            if not spans:
                continue
            pos = np.concatenate(spans)
            # best activation on a matching token per (feature, example)
            best = np.zeros(n_feat * n_ex, np.float32)
            np.maximum.at(best, pos // width, acts[pos].astype(np.float32))
            best = best.reshape(n_feat, n_ex)
            share = best.sum(1) / a["search_n_examples"] / a["search_max_act"]
            ctx += np.clip(share, 0.0, 1.0)
        score = score + in_label / len(terms) + ctx / len(terms)
    order = np.argsort(-score, kind="stable")
    return [(int(i), float(score[i])) for i in order if score[i] > 0]
