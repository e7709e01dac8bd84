"""The engine interface. The servicer talks to engines only through this class, so tests can
run the whole gRPC surface on a tiny random model."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable

from featuresteer_server import domain
from featuresteer_server.errors import Unimplemented
from featuresteer_server.tokenization import Token, Tokenizer


class Engine(ABC):
    """One model, its dictionaries, and the work it can do on them."""

    name: str = "base"
    tokenizer: Tokenizer

    @abstractmethod
    def info(self) -> domain.EngineInfo:
        """Model, dictionaries and engines."""

    def tokenize(self, req: domain.TokenizeRequest) -> list[Token]:
        return self.tokenizer.tokenize(req.text, req.prepend_bos, max_tokens=req.max_tokens)

    @abstractmethod
    async def decode(self, req: domain.DecodeRequest) -> domain.DecodeResult:
        """Feature activations per token for each input and dictionary."""

    def generate(self, req: domain.GenerateRequest) -> AsyncIterator[domain.GenerateChunk]:
        """Stream token chunks, then a final chunk per run (finish_reason, usage; provenance on
        the last). Closing the iterator (client cancel, deadline) aborts the generation."""
        raise Unimplemented("Generate is not implemented by this server version yet")

    async def attribute(
        self,
        req: domain.AttributeRequest,
        progress: Callable[[str, float], None],
        cancel: threading.Event,
    ) -> domain.AttributionResult:
        """Attribution graph or logit ranking. ``progress`` and ``cancel`` are thread-safe;
        a set ``cancel`` stops the work between backward batches."""
        raise Unimplemented("Attribute is not implemented by this engine")

    async def feature_logits(
        self, dictionary_id: str, index: int, k: int
    ) -> tuple[tuple[tuple[int, float], ...], tuple[tuple[int, float], ...]]:
        """Direct logit effect of one decoder row: the ``k`` most promoted and the ``k`` most
        suppressed token ids with their values (descending / ascending)."""
        raise Unimplemented("feature logits are not computed by this engine")

    async def token_promoters(
        self, dictionary_id: str, token_id: int, limit: int
    ) -> tuple[tuple[int, float], ...]:
        """The ``limit`` features of a dictionary whose decoder rows most promote ``token_id``
        (index, direct logit effect per unit activation), best first."""
        raise Unimplemented("token search is not computed by this engine")

    async def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release threads and memory."""
