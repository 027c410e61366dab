"""A generation request's JSON, checked: every bad field is a 400 naming it, with the limit and what came.

``{"prompt": "...", "max_new_tokens": 64, "temperature": 0, "top_p": 1, "top_k": 0, "seed": 1,
"stop": ["\\n\\n"], "stream": false}``: only ``prompt`` is required.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aitune_core.errors import BadRequestError
from aitune_core.generate.sampling import SamplingParams

KEYS = ("prompt", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream")
MAX_STOPS = 16


@dataclasses.dataclass
class GenerateOptions:
    """The manifest's ``request`` section of a text-generation archive (``codec: generate``)."""

    max_context: int
    max_batch: int
    prefill_chunk: int
    eos_token_ids: list[int]
    max_new_tokens: int = 64  # when a request names none (capped by what its context leaves)
    max_prompt_chars: int = 1_000_000
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


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequestError(f"'{name}' must be a number, got {type(value).__name__}")
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
    prompt_ids = tokenizer(prompt)["input_ids"]
    if len(prompt_ids) >= options.max_context:
        raise BadRequestError(f"'prompt' is {len(prompt_ids)} tokens: the archive's context holds "
                              f"{options.max_context} tokens, prompt and generated together (max_context)")
    room = options.max_context - len(prompt_ids)
    max_new = _integer(value.get("max_new_tokens", min(options.max_new_tokens, room)), "max_new_tokens")
    if not 1 <= max_new <= room:
        raise BadRequestError(f"'max_new_tokens' must be between 1 and {room} (the context of {options.max_context} "
                              f"tokens less the prompt's {len(prompt_ids)}), got {max_new}")
    temperature = _number(value.get("temperature", 0.0), "temperature")
    if temperature < 0:
        raise BadRequestError(f"'temperature' must be >= 0 (0: greedy), got {temperature:g}")
    top_p = _number(value.get("top_p", 1.0), "top_p")
    if not 0 < top_p <= 1:
        raise BadRequestError(f"'top_p' must be in (0, 1], got {top_p:g}")
    top_k = _integer(value.get("top_k", 0), "top_k")
    if top_k < 0:
        raise BadRequestError(f"'top_k' must be >= 0 (0: every token), got {top_k}")
    seed = value.get("seed")
    if seed is not None:
        seed = _integer(seed, "seed")
        if not 0 <= seed < 2**63:
            raise BadRequestError(f"'seed' must be between 0 and 2**63 - 1, got {seed}")
    stops = value.get("stop", [])
    stops = [stops] if isinstance(stops, str) else stops
    if not isinstance(stops, list) or not all(isinstance(stop, str) and stop for stop in stops):
        raise BadRequestError(f"'stop' must be a non-empty string or a list of them, got {value.get('stop')!r}"[:200])
    if len(stops) > MAX_STOPS:
        raise BadRequestError(f"'stop' has {len(stops)} strings, at most {MAX_STOPS}")
    stream = value.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequestError(f"'stream' must be true or false, got {stream!r}")
    return GenerateRequest(prompt_ids=list(prompt_ids), max_new_tokens=max_new,
                           sampling=SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
                           stops=stops, stream=stream)
