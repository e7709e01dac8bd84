"""Tokenizer rules: BOS, special tokens, UTF-8 byte offsets and raw bytes."""

from __future__ import annotations

import pytest

from featuresteer_server.tokenization import Tokenizer
from tests.support import default_hf_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(default_hf_tokenizer())


def test_bos_is_explicit(tok: Tokenizer) -> None:
    assert tok.bos_id == 1
    with_bos = tok.encode("Hello", prepend_bos=True)
    without = tok.encode("Hello", prepend_bos=False)
    assert with_bos == [1, *without] and without[0] != 1
    toks = tok.tokenize("Hello", prepend_bos=True)
    assert toks[0].special and toks[0].start == toks[0].end == 0


@pytest.mark.parametrize(
    "text", ["Héllo wörld", "日本語 🎉 mixed", "tabs\tand\nnewlines  ", "a<|im_end|>b"]
)
def test_offsets_are_utf8_bytes_and_cover_the_text(tok: Tokenizer, text: str) -> None:
    toks = tok.tokenize(text, prepend_bos=False)
    data = text.encode("utf-8")
    assert b"".join(t.bytes for t in toks) == data
    for t in toks:
        assert data[t.start : t.end] == t.bytes
    assert toks[0].start == 0 and toks[-1].end == len(data)


def test_split_characters_keep_raw_bytes(tok: Tokenizer) -> None:
    toks = tok.tokenize("🎉", prepend_bos=False)
    assert b"".join(t.bytes for t in toks) == "🎉".encode()
    if len(toks) > 1:  # a token holding part of a character decodes to U+FFFD
        assert any("\ufffd" in t.text for t in toks)


def test_special_tokens_flagged(tok: Tokenizer) -> None:
    toks = tok.tokenize("x<|im_end|>y", prepend_bos=False)
    specials = [t for t in toks if t.special]
    assert [t.id for t in specials] == [2] and specials[0].bytes == b"<|im_end|>"


def test_chat_template_starts_with_bos(tok: Tokenizer) -> None:
    ids = tok.apply_chat_template([("user", "hi")])
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) >= 2
