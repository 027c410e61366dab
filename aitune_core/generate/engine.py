"""The loop around a DEPLOYED backend: every prompt chunk and every decode step is one ``infer``.

``Engine.generate`` runs one request: the prompt in chunks of ``prefill_chunk`` tokens (the last one
padded to a multiple of ``PAD_TO``: a compiled backend's prompt graph is dynamic in length, and a short
prompt should not pay for a whole chunk), then one decode step per new token,
sampling, stopping at an end-of-sequence token, a stop string or the length, and handing each new piece
of text to ``emit`` as soon as it is whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from aitune_core.generate.decoder import window_for
from aitune_core.generate.request import GenerateOptions, GenerateRequest
from aitune_core.generate.sampling import sample
from aitune_core.generate.text import Detokenizer, StopText

Infer = Callable[..., torch.Tensor]  # (tokens, positions, slots[, window]) -> logits, see decoder.py
PAD_TO = 16  # a prompt's last chunk is padded to a multiple of this: few lengths, never a one-token chunk


@dataclasses.dataclass
class Generation:
    """What a request produced: the text, why it ended, and the token counts (``tokens`` for tests and the gate)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    tokens: list[int]

    def answer(self) -> dict[str, Any]:
        return self.last_chunk(self.text)

    def last_chunk(self, text: str) -> dict[str, Any]:
        """A stream's last JSON object: the ``text`` not sent yet, why it ended and the token counts."""
        return {"text": text, "finish_reason": self.finish_reason,
                "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.tokens)}}


def window(options: GenerateOptions, last_position: int, rows: int = 1) -> tuple[torch.Tensor, ...]:
    """The attention window argument of a forward of ``rows`` rows ending at ``last_position``, for a decoder that
    takes one."""
    return (window_for(last_position, options.max_context, rows),) if options.attention_window else ()


def prefill(infer: Infer, ids: list[int], slot: int, options: GenerateOptions,
            every_position: bool = False, done: int = 0) -> torch.Tensor:
    """Run ``ids`` (but the first ``done``, already in the cache) into ``slot``, a prompt chunk a call; the logits
    of the last token ``[vocabulary]``, or of every token run ``[len(ids) - done, vocabulary]`` with
    ``every_position``."""
    chunk, max_context = options.prefill_chunk, options.max_context
    outputs = []
    for start in range(done, len(ids), chunk):
        part = ids[start:start + chunk]
        real = len(part)
        length = min(chunk, -(-real // PAD_TO) * PAD_TO)
        # The padding's positions lie past the prompt (clamped into the cache), masked until overwritten by
        # the real tokens that come later.
        tokens = torch.tensor([part + [part[-1]] * (length - real)])
        positions = torch.clamp(torch.arange(start, start + length), max=max_context - 1).unsqueeze(0)
        extra = window(options, min(start + length, max_context) - 1)
        logits = infer(tokens, positions, torch.tensor([slot]), *extra)[0, :real]
        outputs.append(logits if every_position else logits[-1:])
    return torch.cat(outputs) if every_position else outputs[-1][0]


class Sequence:
    """One request being decoded: sampling, stopping and streaming after each forward, whoever batches it.

    ``take(logits)`` samples the next token from the logits of the last forward, sends the text it completes
    through ``emit``, and returns the token and the position it goes in for the next forward, or None once
    the request is finished (``finish`` says why); ``result()`` then gives what it produced.
    """

    def __init__(self, request: GenerateRequest, tokenizer: Any, eos: set[int], slot: int = 0,
                 emit: Callable[[str], None] | None = None) -> None:
        self.request = request
        self.slot = slot
        self.eos = eos
        self.emit = emit
        self.generator = request.sampling.generator()
        self.detokenizer = Detokenizer(tokenizer, request.prompt_ids)
        self.text = StopText(request.stops)
        self.tokens: list[int] = []
        self.finish: str | None = None

    def _send(self, piece: str) -> None:
        if piece and self.emit is not None:
            self.emit(piece)

    def take(self, logits: torch.Tensor) -> tuple[int, int] | None:
        """The next (token, position) to run, or None when the request ended with this token."""
        return self.accept(sample(logits.float(), self.request.sampling, self.generator))

    def accept(self, token: int) -> tuple[int, int] | None:
        """``take`` for a token already chosen (a batch's greedy tokens come from one argmax over all its rows)."""
        self.tokens.append(token)
        if token in self.eos:
            self.finish = "stop"
        else:
            piece, stopped = self.text.add(self.detokenizer.add(token))
            self._send(piece)
            if stopped:
                self.finish = "stop"
                return None
            if len(self.tokens) == self.request.max_new_tokens:
                self.finish = "length"
        if self.finish is None:
            return token, len(self.request.prompt_ids) + len(self.tokens) - 1
        # Ended by an end-of-sequence token or the length: what the detokenizer and stop strings still hold goes out.
        self._send(self.text.add(self.detokenizer.flush())[0])
        return None

    def result(self) -> Generation:
        self._send(self.text.flush())
        return Generation(text=self.text.text, finish_reason=self.finish or "length",
                          prompt_tokens=len(self.request.prompt_ids), tokens=self.tokens)


class Engine:
    """Generation on one deployed backend's ``infer``, with the archive's tokenizer and limits."""

    def __init__(self, infer: Infer, tokenizer: Any, options: GenerateOptions) -> None:
        self.infer = infer
        self.tokenizer = tokenizer
        self.options = options
        self.eos = set(options.eos_token_ids)

    def sequence(self, request: GenerateRequest, slot: int, emit: Callable[[str], None] | None = None) -> Sequence:
        """``request`` as a ``Sequence`` in cache ``slot``, its prompt not run yet."""
        return Sequence(request, self.tokenizer, self.eos, slot, emit)

    def start(self, request: GenerateRequest, slot: int, emit: Callable[[str], None] | None = None
              ) -> tuple[Sequence, tuple[int, int] | None]:
        """Run ``request``'s prompt into ``slot``; its ``Sequence`` and the first (token, position) to decode."""
        logits = prefill(self.infer, request.prompt_ids, slot, self.options)
        sequence = self.sequence(request, slot, emit)
        return sequence, sequence.take(logits)

    def generate(self, request: GenerateRequest, emit: Callable[[str], None] | None = None,
                 slot: int = 0) -> Generation:
        """Run ``request`` to its end in cache ``slot``; ``emit(piece)`` for each piece of new text."""
        # no_grad, not inference_mode: the ids made here must be ordinary tensors, as a compiled backend's
        # warm-up saw them (an inference tensor is a guard failure: a recompile). infer itself runs in inference mode.
        with torch.no_grad():
            sequence, step = self.start(request, slot, emit)
            while step is not None:
                token, position = step
                logits = self.infer(torch.tensor([[token]]), torch.tensor([[position]]), torch.tensor([slot]),
                                    *window(self.options, position))
                step = sequence.take(logits[0, -1])
        return sequence.result()
