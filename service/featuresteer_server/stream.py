"""Generated token ids -> the chunks a Generate stream sends, the same on every engine:
incremental text (held back while a UTF-8 character is split), byte offsets into the
completion, stop strings, the one-step delay of a traced token, and the run's finish reason.

Must not: run a model, touch asyncio, parse protobuf.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from featuresteer_server import domain
from featuresteer_server.planning import RunPlan
from featuresteer_server.tokenization import Token, Tokenizer


class TokenStream:
    """Turns generated ids into chunks: incremental text (held back while a UTF-8 character
    is split), byte offsets into the completion, stop strings, one-step delay for the trace
    (a token's features are computed when it is fed back in)."""

    def __init__(
        self,
        tok: Tokenizer,
        plan: RunPlan,
        prompt_len: int,
        emit: Callable[[domain.GenerateChunk], None],
        trace_by_pos: dict[int, tuple[tuple[int, float], ...]],
    ) -> None:
        self.tok = tok
        self.plan = plan
        self.prompt_len = prompt_len
        self.emit = emit
        self.trace_by_pos = trace_by_pos
        self.ids: list[int] = []
        self.text = ""
        self.sent = ""
        self.offset = 0
        self.stopped = False
        self.pending: tuple[int, int, float | None] | None = None

    def on_token(self, token: int, position: int, logprob: float | None) -> None:
        self.ids.append(token)
        if token == self.tok.eos_id:
            self._release()  # EOS ends the run and is not streamed
            return
        if self.plan.trace is not None:
            self._release()
            self.pending = (token, position, logprob)
        else:
            self._send(token, position, logprob)
        if self.plan.stop:
            full = self.tok.decode([t for t in self.ids if t != self.tok.eos_id])
            if any(s and s in full for s in self.plan.stop):
                self.stopped = True

    def _release(self) -> None:
        if self.pending is not None:
            self._send(*self.pending)
            self.pending = None

    def flush(self) -> None:
        self._release()
        if self.text != self.sent:  # a held-back partial character at the very end
            self.emit(
                domain.GenerateChunk(
                    text=self.text[len(self.sent) :],
                    position=self.prompt_len + len(self.ids) - 1,
                    baseline=self.plan.baseline,
                )
            )
            self.sent = self.text

    def _send(self, token: int, position: int, logprob: float | None) -> None:
        raw = self.tok.token_bytes(token)
        rec = Token(
            token,
            raw.decode("utf-8", "replace"),
            raw,
            self.offset,
            self.offset + len(raw),
            token in self.tok.special_ids,
        )
        self.offset += len(raw)
        upto = self.ids[: position - self.prompt_len + 1]
        self.text = self.tok.decode(upto)
        delta = ""
        if not self.text.endswith("\ufffd") and self.text.startswith(self.sent):
            delta, self.sent = self.text[len(self.sent) :], self.text
        trace = self.trace_by_pos.pop(position, ()) if self.plan.trace is not None else ()
        self.emit(
            domain.GenerateChunk(
                token=rec,
                text=delta,
                position=position,
                logprob=logprob if logprob is None or math.isfinite(logprob) else None,
                trace=trace,
                baseline=self.plan.baseline,
            )
        )

    def finish_reason(self) -> domain.FinishReason:
        """STOP (a stop string), EOS (the last kept token is EOS) or LENGTH."""
        eos = self.tok.eos_id
        if self.stopped:
            return domain.FinishReason.STOP
        if self.ids and eos is not None and self.ids[-1] == eos:
            return domain.FinishReason.EOS
        return domain.FinishReason.LENGTH
