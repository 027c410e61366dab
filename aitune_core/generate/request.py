"""A generation request's JSON, checked: every bad field is a 400 naming it, with the limit and what came.

``{"prompt": "...", "max_new_tokens": 64, "temperature": 0, "top_p": 1, "top_k": 0, "seed": 1,
"stop": ["\\n\\n"], "stream": false}``: only ``prompt`` is required.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from aitune_core.errors import BadRequestError
from aitune_core.generate.sampling import SamplingParams

KEYS = ("prompt", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_interval")
MAX_STOPS = 16
MAX_STREAM_INTERVAL = 64
MIN_TEMPERATURE = 1e-4


@dataclasses.dataclass
class GenerateOptions:
    """The manifest's ``request`` section of a text-generation archive (``codec: generate``)."""

    max_context: int
    max_batch: int
    prefill_chunk: int
    eos_token_ids: list[int]
    max_new_tokens: int = 64  # when a request names none (capped by what its context leaves)
    max_prompt_chars: int = 1_000_000
    # The decode steps a lone stream's reply carries at least (the last may carry fewer; the first token goes
    # out at once): fewer round trips through TorchServe's frontend, text in bursts (vLLM's --stream-interval).
    stream_interval: int = 1
    # The decoder takes an attention window (a 4th input, see decoder.py); archives made before it take 3.
    attention_window: bool = False
    gate: dict[str, Any] | None = None  # the generation gate's figures at archive time
    tuning: list[dict[str, Any]] | None = None  # --tune's table, one dict per candidate

    def to_dict(self) -> dict[str, Any]:
        return {"codec": "generate", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, section: dict[str, Any]) -> "GenerateOptions":
        return cls(**{key: value for key, value in section.items() if key != "codec"})


@dataclasses.dataclass
class GenerateRequest:
    """One checked request: the prompt's token ids and how to continue it."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stops: list[str]
    stream: bool
    stream_interval: int = 1  # see GenerateOptions.stream_interval


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequestError(f"'{name}' must be a finite number, got {value!r}"[:200])
    return float(value)


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequestError(f"'{name}' must be an integer, got {value!r}")
    return value


def parse(value: Any, tokenizer: Any, options: GenerateOptions) -> GenerateRequest:
    """``value`` (a JSON object, or a JSON string: the prompt) checked against the archive's limits."""
    if isinstance(value, str):
        value = {"prompt": value}
    if not isinstance(value, dict):
        raise BadRequestError(f"expected a JSON object with 'prompt', got {type(value).__name__}")
    unknown = sorted(set(value) - set(KEYS))
    if unknown:
        raise BadRequestError(f"unknown key(s) {', '.join(map(repr, unknown))}: expected some of {', '.join(KEYS)}")
    prompt = value.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise BadRequestError(f"'prompt' must be a non-empty string, got {prompt!r}"[:200])
    if len(prompt) > options.max_prompt_chars:
        raise BadRequestError(f"'prompt' has {len(prompt)} characters, at most {options.max_prompt_chars}")
    return build(value, list(tokenizer(prompt)["input_ids"]), options)


def build(fields: dict[str, Any], prompt_ids: list[int], options: GenerateOptions,
          names: dict[str, str] | None = None) -> GenerateRequest:
    """A request from tokenized prompt ids and the optional fields of ``KEYS``, each checked.

    ``names`` maps a field to the name its wire format gives it (OpenAI's ``max_tokens``), so that a 400 names
    what the client sent.
    """
    def name(key: str) -> str:
        return (names or {}).get(key, key)

    if not prompt_ids:
        raise BadRequestError(f"'{name('prompt')}' is empty once tokenized: send some text")
    if len(prompt_ids) >= options.max_context:
        raise BadRequestError(f"'{name('prompt')}' is {len(prompt_ids)} tokens: the archive's context holds "
                              f"{options.max_context} tokens, prompt and generated together (max_context)")
    room = options.max_context - len(prompt_ids)
    max_new = fields.get("max_new_tokens")
    max_new = min(options.max_new_tokens, room) if max_new is None else _integer(max_new, name("max_new_tokens"))
    if not 1 <= max_new <= room:
        raise BadRequestError(f"'{name('max_new_tokens')}' must be between 1 and {room} (the context of "
                              f"{options.max_context} tokens less the prompt's {len(prompt_ids)}), got {max_new}")
    temperature = _number(fields.get("temperature", 0.0), name("temperature"))
    if temperature < 0:
        raise BadRequestError(f"'{name('temperature')}' must be >= 0 (0: greedy), got {temperature:g}")
    if temperature < MIN_TEMPERATURE:  # dividing the logits by less overflows them: the same as greedy
        temperature = 0.0
    top_p = _number(fields.get("top_p", 1.0), name("top_p"))
    if not 0 < top_p <= 1:
        raise BadRequestError(f"'{name('top_p')}' must be in (0, 1], got {top_p:g}")
    top_k = _integer(fields.get("top_k", 0), name("top_k"))
    if top_k < 0:
        raise BadRequestError(f"'{name('top_k')}' must be >= 0 (0: every token), got {top_k}")
    seed = fields.get("seed")
    if seed is not None:
        seed = _integer(seed, name("seed"))
        if not 0 <= seed < 2**63:
            raise BadRequestError(f"'{name('seed')}' must be between 0 and 2**63 - 1, got {seed}")
    stops = fields.get("stop")
    stops = [] if stops is None else [stops] if isinstance(stops, str) else stops
    if not isinstance(stops, list) or not all(isinstance(stop, str) and stop for stop in stops):
        raise BadRequestError(f"'{name('stop')}' must be a non-empty string or a list of them, "
                              f"got {fields.get('stop')!r}"[:200])
    if len(stops) > MAX_STOPS:
        raise BadRequestError(f"'{name('stop')}' has {len(stops)} strings, at most {MAX_STOPS}")
    stream = fields.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequestError(f"'{name('stream')}' must be true or false, got {stream!r}")
    interval = _integer(fields.get("stream_interval", options.stream_interval), name("stream_interval"))
    if not 1 <= interval <= MAX_STREAM_INTERVAL:
        raise BadRequestError(f"'{name('stream_interval')}' must be between 1 and {MAX_STREAM_INTERVAL} (decode steps "
                              f"a streamed reply carries), got {interval}")
    return GenerateRequest(prompt_ids=list(prompt_ids), max_new_tokens=max_new,
                           sampling=SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
                           stops=stops, stream=stream, stream_interval=interval)
