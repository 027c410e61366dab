"""The loop around a DEPLOYED backend: every prompt chunk and every decode step is one ``infer``.

``Engine.generate`` runs one request: the prompt in chunks of ``prefill_chunk`` tokens (the last one
padded to the same shape, so a compiled backend sees one shape), then one decode step per new token,
sampling, stopping at an end-of-sequence token, a stop string or the length, and handing each new piece
of text to ``emit`` as soon as it is whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from aitune_core.generate.request import GenerateOptions, GenerateRequest
from aitune_core.generate.sampling import sample
from aitune_core.generate.text import Detokenizer, StopText

Infer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class Generation:
    """What a request produced: the text, why it ended, and the token counts (``tokens`` for tests and the gate)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    tokens: list[int]

    def answer(self) -> dict[str, Any]:
        return {"text": self.text, "finish_reason": self.finish_reason,
                "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.tokens)}}


def prefill(infer: Infer, ids: list[int], slot: int, chunk: int, max_context: int,
            every_position: bool = False) -> torch.Tensor:
    """Run ``ids`` into ``slot`` from position 0, ``chunk`` tokens a call; the logits of the last token
    ``[vocabulary]``, or of every token ``[len(ids), vocabulary]`` with ``every_position``."""
    outputs = []
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        real = len(part)
        # Padding keeps one shape; its positions lie past the prompt (clamped into the cache), masked until
        # overwritten by the real tokens that come later.
        tokens = torch.tensor([part + [part[-1]] * (chunk - real)])
        positions = torch.clamp(torch.arange(start, start + chunk), max=max_context - 1).unsqueeze(0)
        logits = infer(tokens, positions, torch.tensor([slot]))[0, :real]
        outputs.append(logits if every_position else logits[-1:])
    return torch.cat(outputs) if every_position else outputs[-1][0]


class Engine:
    """Generation on one deployed backend's ``infer``, with the archive's tokenizer and limits."""

    def __init__(self, infer: Infer, tokenizer: Any, options: GenerateOptions) -> None:
        self.infer = infer
        self.tokenizer = tokenizer
        self.options = options
        self.eos = set(options.eos_token_ids)

    def generate(self, request: GenerateRequest, emit: Callable[[str], None] | None = None,
                 slot: int = 0) -> Generation:
        """Run ``request`` to its end in cache ``slot``; ``emit(piece)`` for each piece of new text."""
        options = self.options
        # no_grad, not inference_mode: the ids made here must be ordinary tensors, as a compiled backend's
        # warm-up saw them (an inference tensor is a guard failure: a recompile). infer itself runs in inference mode.
        with torch.no_grad():
            logits = prefill(self.infer, request.prompt_ids, slot, options.prefill_chunk, options.max_context)
            generator = request.sampling.generator()
            detokenizer = Detokenizer(self.tokenizer, request.prompt_ids)
            text = StopText(request.stops)
            tokens: list[int] = []
            position = len(request.prompt_ids)
            finish = "length"
            while True:
                token = sample(logits.float(), request.sampling, generator)
                tokens.append(token)
                if token in self.eos:
                    finish = "stop"
                    break
                piece, stopped = text.add(detokenizer.add(token))
                if piece and emit is not None:
                    emit(piece)
                if stopped:
                    finish = "stop"
                    break
                if len(tokens) == request.max_new_tokens:
                    break
                logits = self.infer(torch.tensor([[token]]), torch.tensor([[position]]), torch.tensor([slot]))[0, -1]
                position += 1
            if finish == "length" or (finish == "stop" and tokens[-1] in self.eos):
                piece, stopped = text.add(detokenizer.flush())
                if piece and emit is not None:
                    emit(piece)
            rest = text.flush()
            if rest and emit is not None:
                emit(rest)
        return Generation(text=text.text, finish_reason=finish, prompt_tokens=len(request.prompt_ids), tokens=tokens)
