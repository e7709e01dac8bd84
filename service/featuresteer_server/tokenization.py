"""The one tokenizer module every engine and RPC uses.

Rules (DESIGN.md "Tokenization and positions"): engines receive token ids only, never
text. ``prepend_bos`` (default true) adds the model's BOS id explicitly — SmolLM2's GGUF
says add_bos_token=False, TransformerLens would prepend, HF/vLLM would not, so the decision
is made here once. ``Token.start``/``end`` are UTF-8 byte offsets into the request's text
and ``Token.bytes`` holds the token's raw bytes (a token may split a UTF-8 character).

Tokenizing is CPU work that callers run off the event loop (a worker thread): ``encode``
goes through the Hugging Face batch path, which releases the GIL; ``tokenize`` with
``max_tokens`` refuses an over-long text before building its token records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from featuresteer_server.errors import InvalidArgument


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    bytes: bytes
    start: int
    end: int
    special: bool


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level alphabet (printable stand-ins for the 256 bytes)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class Tokenizer:
    """Wraps a Hugging Face tokenizer with the service's BOS and offset rules."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        bos = hf_tokenizer.bos_token_id
        self.bos_id: int = int(bos if bos is not None else 0)
        eos = hf_tokenizer.eos_token_id
        self.eos_id: int | None = int(eos) if eos is not None else None
        self.vocab_size: int = len(hf_tokenizer)
        added = getattr(hf_tokenizer, "added_tokens_decoder", {}) or {}
        self.special_ids: frozenset[int] = frozenset(
            [int(i) for i in hf_tokenizer.all_special_ids]
            + [int(i) for i, tok in added.items() if getattr(tok, "special", False)]
        )
        decoder = getattr(hf_tokenizer, "backend_tokenizer", None)
        self._byte_level = decoder is not None and "ByteLevel" in str(decoder.pre_tokenizer)
        self._bytes: dict[int, bytes] = {}  # token id -> raw bytes, filled on first use

    # -- ids
    def encode(self, text: str, prepend_bos: bool = True) -> list[int]:
        ids = list(self.hf.encode(text, add_special_tokens=False))
        return [self.bos_id, *ids] if prepend_bos else ids

    def check_ids(self, ids: Sequence[int], field: str) -> None:
        for i, t in enumerate(ids):
            if not 0 <= t < self.vocab_size:
                raise InvalidArgument(
                    f"{field}[{i}]", f"token id {t} outside [0, {self.vocab_size})"
                )

    # -- tokens with bytes and offsets
    def token_bytes(self, token_id: int) -> bytes:
        raw = self._bytes.get(token_id)
        if raw is None:  # one tokenizer call per vocabulary entry, not per token
            raw = self._token_bytes(int(token_id))
            if 0 <= token_id < self.vocab_size:
                self._bytes[int(token_id)] = raw
        return raw

    def _token_bytes(self, token_id: int) -> bytes:
        piece = self.hf.convert_ids_to_tokens(int(token_id))
        if piece is None:
            return b""
        if token_id in self.special_ids or not self._byte_level:
            return str(self.hf.decode([int(token_id)])).encode("utf-8")
        table = _byte_decoder()
        try:
            return bytes(table[c] for c in piece)
        except KeyError:  # an added (non byte-level) token
            return str(self.hf.decode([int(token_id)])).encode("utf-8")

    def tokens(self, ids: Sequence[int], *, n_added: int = 0) -> list[Token]:
        """Token records for ``ids``; offsets index the concatenation of the token bytes after
        the first ``n_added`` tokens (which are not part of the text: start == end == 0)."""
        out: list[Token] = []
        pos = 0
        for i, tid in enumerate(ids):
            raw = self.token_bytes(tid)
            special = int(tid) in self.special_ids
            if i < n_added:
                out.append(Token(int(tid), raw.decode("utf-8", "replace"), raw, 0, 0, special))
                continue
            out.append(
                Token(int(tid), raw.decode("utf-8", "replace"), raw, pos, pos + len(raw), special)
            )
            pos += len(raw)
        return out

    def tokenize(
        self,
        text: str,
        prepend_bos: bool = True,
        *,
        max_tokens: int | None = None,
        field: str = "text",
    ) -> list[Token]:
        """Tokens of ``text`` with UTF-8 byte offsets into it; more than ``max_tokens`` is
        INVALID_ARGUMENT on ``field``, refused before any token record is built."""
        ids = self.encode(text, prepend_bos)
        if max_tokens is not None and len(ids) > max_tokens:
            raise InvalidArgument(field, f"{len(ids)} tokens > the limit of {max_tokens}")
        n_added = 1 if prepend_bos else 0
        toks = self.tokens(ids, n_added=n_added)
        if b"".join(t.bytes for t in toks[n_added:]) != text.encode("utf-8"):
            toks = self._offsets_from_mapping(text, ids, n_added)
        return toks

    def _offsets_from_mapping(self, text: str, ids: list[int], n_added: int) -> list[Token]:
        """Fallback for tokenizers that normalise text: map character offsets to bytes."""
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        char_to_byte = [0]
        for ch in text:
            char_to_byte.append(char_to_byte[-1] + len(ch.encode("utf-8")))
        toks = self.tokens(ids[:n_added], n_added=n_added)
        for tid, (s, e) in zip(ids[n_added:], enc["offset_mapping"], strict=True):
            raw = self.token_bytes(tid)
            toks.append(
                Token(
                    int(tid),
                    raw.decode("utf-8", "replace"),
                    raw,
                    char_to_byte[s],
                    char_to_byte[e],
                    int(tid) in self.special_ids,
                )
            )
        return toks

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.hf.decode(list(ids), skip_special_tokens=False))

    def apply_chat_template(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Token ids of a chat prompt (the template itself opens turns with BOS)."""
        msgs = [{"role": r, "content": c} for r, c in messages]
        text = self.hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return self.encode(str(text), prepend_bos=False)
