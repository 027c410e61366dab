"""OpenAI's API for a text-generation archive: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

TorchServe hands ``/predictions/NAME/VERSION/v1/...`` to the worker with ``v1/...`` in the ``url_path`` header,
so ``http://HOST:8080/predictions/NAME/1.0/v1`` is the base URL an OpenAI client takes. A request becomes a
``GenerateRequest`` (OpenAI's names and defaults: ``max_tokens``, temperature 1); the answer is OpenAI's
JSON, or with ``"stream": true`` Server-Sent Events (``data: {...}`` chunks, then ``data: [DONE]``).
Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any

from aitune_core.errors import BadRequestError
from aitune_core.generate.engine import Generation
from aitune_core.generate.request import GenerateOptions, GenerateRequest, build
from aitune_core.wire import Request, Response, compact_json, parse_json

URL_HEADER = "url_path"
SSE_CONTENT_TYPE = "text/event-stream"
DONE = "data: [DONE]\n\n"
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat continues up to the context
# Accepted with these values only (what clients send by default); anything else is a 400 naming it.
NEUTRAL = {"n": (1, None), "echo": (False, None), "logprobs": (None, False), "top_logprobs": (None, 0),
           "presence_penalty": (0, None), "frequency_penalty": (0, None), "best_of": (1, None),
           "logit_bias": (None,), "suffix": (None,), "tools": (None,), "tool_choice": (None, "none"),
           "parallel_tool_calls": (None,), "response_format": (None,), "user": ()}
SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options")
KEYS = {"v1/completions": ("model", "prompt", *SAMPLING, *NEUTRAL),
        "v1/chat/completions": ("model", "messages", "max_completion_tokens", *SAMPLING, *NEUTRAL)}
ROLES = ("system", "user", "assistant", "developer", "tool")


class OpenAIError(BadRequestError):
    """A request OpenAI's API refuses: its status, and the parameter at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def is_openai(request: Request) -> bool:
    path = request.headers.get(URL_HEADER, "")
    return path == "v1" or path.startswith("v1/")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return Response(status, compact_json(body), error=message)


def models_response(model_name: str) -> Response:
    return Response(200, compact_json({"object": "list", "data": [
        {"id": model_name, "object": "model", "created": 0, "owned_by": "aitune"}]}))


@dataclasses.dataclass
class OpenAICall:
    """A decoded completion or chat request, and how its answer and stream chunks are written."""

    chat: bool
    request: GenerateRequest
    model: str
    include_usage: bool = False
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = self.object + (".chunk" if chunk and self.chat else "")
        return {"id": ("chatcmpl-" if self.chat else "cmpl-") + self.id, "object": kind, "created": self.created,
                "model": self.model}

    def _choice(self, text: str | None, finish: str | None, chunk: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if chunk:
            return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                    "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    def _event(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body = {**self._head(chunk=True), "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return f"data: {compact_json(body)}\n\n"

    def opening(self) -> list[str]:
        """The events before the first piece of text (a chat stream names the role first)."""
        if not self.chat:
            return []
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return [self._event([choice])]

    def piece(self, text: str) -> str:
        return self._event([self._choice(text, None, chunk=True)])

    def closing(self, generation: Generation) -> list[str]:
        """The events after the last piece: the finish reason, and the usage when asked."""
        events = [self._event([self._choice(None if self.chat else "", generation.finish_reason, chunk=True)])]
        if self.include_usage:
            events.append(self._event([], usage(generation)))
        return events

    def failed(self, status: int, message: str) -> str:
        """An error after the stream began: one event in OpenAI's error shape (the client raises it)."""
        return f"data: {error_response(status, message).body}\n\n"

    def answer(self, generation: Generation) -> Response:
        body = {**self._head(chunk=False), "choices": [self._choice(generation.text, generation.finish_reason, False)],
                "usage": usage(generation)}
        return Response(200, compact_json(body))


def usage(generation: Generation) -> dict[str, int]:
    return {"prompt_tokens": generation.prompt_tokens, "completion_tokens": len(generation.tokens),
            "total_tokens": generation.prompt_tokens + len(generation.tokens)}


def read(request: Request, tokenizer: Any, options: GenerateOptions, model_name: str) -> OpenAICall | Response:
    """The call ``request`` asks for, or the answer it gets at once (``/v1/models``); OpenAIError naming a problem."""
    path = request.headers.get(URL_HEADER, "").rstrip("/")
    if path == "v1/models":
        return models_response(model_name)
    if path not in KEYS:
        raise OpenAIError(f"unknown endpoint /{path}: this model serves /v1/completions, /v1/chat/completions and "
                          "/v1/models", status=404, code="unknown_url")
    body = _body(request)
    chat = path == "v1/chat/completions"
    unknown = sorted(set(body) - set(KEYS[path]))
    if unknown:
        raise OpenAIError(f"unsupported parameter(s) {', '.join(map(repr, unknown))} for /{path}", param=unknown[0])
    for key, allowed in NEUTRAL.items():
        if key in body and allowed and not any(_same(body[key], value) for value in allowed):
            shown = " or ".join(json.dumps(value) for value in allowed)
            raise OpenAIError(f"'{key}' is supported only as {shown}, got {json.dumps(body[key])[:80]}", param=key)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise OpenAIError(f"'model' must be a string, got {json.dumps(model)[:80]}", param="model")
    if model is not None and model != model_name:
        raise OpenAIError(f"the model '{model}' does not exist here: this endpoint serves '{model_name}'",
                          param="model", status=404, code="model_not_found")
    prompt_ids = _chat_ids(body, tokenizer, options) if chat else _prompt_ids(body, tokenizer, options)

    def given(key: str, default: Any = None) -> Any:  # clients send null for "not given"
        return default if body.get(key) is None else body[key]

    max_tokens = given("max_completion_tokens", given("max_tokens")) if chat else given("max_tokens")
    if max_tokens is None:
        room = options.max_context - len(prompt_ids)
        max_tokens = max(min(COMPLETION_MAX_TOKENS, room) if not chat else room, 1)
    fields = {"max_new_tokens": max_tokens, "temperature": given("temperature", 1.0), "top_p": given("top_p", 1.0),
              "top_k": given("top_k", 0), "seed": given("seed"), "stop": given("stop"),
              "stream": given("stream", False)}
    names = {"max_new_tokens": "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens",
             "prompt": "messages" if chat else "prompt"}
    try:
        generate = build(fields, prompt_ids, options, names)
    except BadRequestError as error:
        raise OpenAIError(str(error), param=str(error).split("'")[1] if str(error).startswith("'") else None) from None
    stream_options = body.get("stream_options")
    if stream_options is not None and (not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}
                                       or not isinstance(stream_options.get("include_usage", False), bool)):
        raise OpenAIError(f"'stream_options' must be {{\"include_usage\": true|false}}, got "
                          f"{json.dumps(stream_options)[:80]}", param="stream_options")
    if stream_options is not None and not generate.stream:
        raise OpenAIError("'stream_options' is only allowed with \"stream\": true", param="stream_options")
    include_usage = bool((stream_options or {}).get("include_usage", False))
    return OpenAICall(chat=chat, request=generate, model=model_name, include_usage=include_usage)


def _same(given: Any, allowed: Any) -> bool:
    """JSON equality where true is not 1 and 0.0 is 0."""
    if isinstance(given, bool) or isinstance(allowed, bool) or given is None or allowed is None:
        return given is allowed
    return given == allowed


def _body(request: Request) -> dict[str, Any]:
    if "body" not in request.parameters:
        raise OpenAIError("the request has no JSON body: send one with 'Content-Type: application/json'")
    body = parse_json(request.parameters["body"], request.content_types.get("body"))
    if not isinstance(body, dict):
        raise OpenAIError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _prompt_ids(body: dict[str, Any], tokenizer: Any, options: GenerateOptions) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(token, int) and not isinstance(token, bool)
                                                   for token in prompt):
        if not all(0 <= token < len(tokenizer) for token in prompt):
            raise OpenAIError(f"'prompt' has token ids outside the vocabulary of {len(tokenizer)}", param="prompt")
        return list(prompt)
    if not isinstance(prompt, str) or not prompt:
        raise OpenAIError(f"'prompt' must be a non-empty string, one string in a list, or a list of token ids "
                          f"(one prompt per request: n and batched prompts are not supported), got "
                          f"{json.dumps(prompt)[:80]}", param="prompt")
    if len(prompt) > options.max_prompt_chars:
        raise OpenAIError(f"'prompt' has {len(prompt)} characters, at most {options.max_prompt_chars}", param="prompt")
    return list(tokenizer(prompt)["input_ids"])


def _chat_ids(body: dict[str, Any], tokenizer: Any, options: GenerateOptions) -> list[int]:
    """The folder's chat template applied to the messages, ready for the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIError("this model's folder has no chat template (tokenizer_config.json's chat_template or "
                          "chat_template.jinja): use /v1/completions with a prompt", param="messages")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(f"'messages' must be a non-empty list of {{\"role\", \"content\"}}, got "
                          f"{json.dumps(messages)[:80]}", param="messages")
    plain = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise OpenAIError(f"messages[{index}] must be an object with a 'role' among {', '.join(ROLES)}, got "
                              f"{json.dumps(message)[:80]}", param=f"messages[{index}]")
        # OpenAI's newer name for the system role, which chat templates do not know
        role = "system" if message["role"] == "developer" else message["role"]
        plain.append({"role": role, "content": _content(message.get("content"), index)})
    size = sum(len(message["content"]) for message in plain)
    if size > options.max_prompt_chars:
        raise OpenAIError(f"'messages' hold {size} characters, at most {options.max_prompt_chars}", param="messages")
    try:
        text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # noqa: BLE001 - a template's raise_exception (roles must alternate...) is the client's
        raise OpenAIError(f"the model's chat template refused the messages: {error}", param="messages") from None
    # The template writes the special tokens (BOS...) itself: tokenizing must not add them again.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _content(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        return "".join(part["text"] for part in content)
    raise OpenAIError(f"messages[{index}].content must be a string or a list of text parts (images and audio are "
                      f"not supported), got {json.dumps(content)[:80]}", param=f"messages[{index}].content")

