"""Generated tokens as text: whole UTF-8 pieces as soon as they are decoded, stop strings never sent.

``Detokenizer`` decodes incrementally the way text-generation servers do: it decodes a window of recent
tokens twice (with and without the new ones) and sends the difference, waiting while the tail is an
incomplete UTF-8 sequence (U+FFFD), so a piece never splits a character and spaces a tokenizer adds
between words come out right. ``StopText`` holds back the text that could still become a stop string,
finds stop strings across token boundaries, and cuts the text before the first one.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"
MAX_HELD = 4


class Detokenizer:
    """Token ids in, new text out."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        # Start from the prompt's last tokens so the first piece gets the spacing it has in context.
        self.ids = list(prompt_ids[-4:])
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, token: int) -> str:
        """The text ``token`` completes (maybe ``""`` while a character is incomplete)."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        # A UTF-8 character spans at most 4 bytes: past that many held tokens the bytes are invalid, not
        # incomplete (a model can emit them), and are sent as they decode rather than holding the stream.
        if len(after) > len(before) and (not after.endswith(REPLACEMENT) or len(self.ids) - self.read >= MAX_HELD):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """What is still held at the end (a character the last tokens left incomplete comes out as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


class StopText:
    """Accumulates the generated text; ``add`` returns what may be sent now, and whether a stop string ended it."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.hold = max((len(stop) for stop in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0

    def add(self, piece: str) -> tuple[str, bool]:
        self.text += piece
        found = [index for index in (self.text.find(stop, max(0, self.sent - self.hold)) for stop in self.stops)
                 if index >= 0]
        if found:
            self.text = self.text[:min(found)]
            return self.flush(), True
        ready = max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:ready], ready
        return out, False

    def flush(self) -> str:
        """Whatever is held back, at the end."""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out
