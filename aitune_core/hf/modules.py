"""The ``nn.Module`` each task wraps around a transformers model.

Every one is ``forward(input_ids, attention_mask) -> tensor``, so each backend builds, quantizes,
compiles and checks it like any other model, and one request is one ``infer``:

- ``SentenceEmbedder``: the encoder's last hidden state, pooled (sentence-transformers' modes),
  optional Dense layers, optional L2 normalisation -> ``[texts, dim]``;
- ``Logits``: a transformers head's logits -> ``[texts, labels]`` or ``[texts, tokens, labels]``;
- ``MaskLogits``: a masked-LM's logits at each text's one mask token -> ``[texts, vocabulary]``
  (the vocabulary at every other position is never sent back).
"""

from __future__ import annotations

import torch

# sentence-transformers' pooling modes, in the order it concatenates them.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# Activations a sentence-transformers Dense layer may name (by class name): no other code is imported.
DENSE_ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid", "SiLU", "LeakyReLU", "ELU", "Softplus")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """``[texts, tokens, dim]`` -> ``[texts, dim]`` over the tokens ``attention_mask`` keeps, as sentence-transformers pools."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":  # the first kept token (left padding puts it later)
        first = attention_mask.to(torch.int32).argmax(dim=1)
        return hidden.gather(1, first.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])).squeeze(1)
    if mode == "max":
        return hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
    if mode in ("mean", "mean_sqrt_len_tokens"):
        count = mask.sum(dim=1).clamp(min=1e-9)
        return (hidden * mask).sum(dim=1) / (count if mode == "mean" else count.sqrt())
    if mode == "weightedmean":  # weights 1, 2, ... from the first kept token
        start = attention_mask.to(torch.int32).argmax(dim=1).view(-1, 1, 1)
        weights = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype).view(1, -1, 1)
        weighted = mask * (weights - start.to(hidden.dtype))
        return (hidden * weighted).sum(dim=1) / weighted.sum(dim=1).clamp(min=1e-9)
    if mode == "lasttoken":
        values, from_end = attention_mask.flip(1).max(1)
        from_end = torch.where(values == 0, hidden.shape[1] - 1, from_end)
        last = (hidden.shape[1] - 1 - from_end).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
        return (hidden * mask).gather(1, last).squeeze(1)
    raise ValueError(f"unknown pooling mode {mode!r}: expected one of {', '.join(POOLING_MODES)}")


class Dense(torch.nn.Module):
    """sentence-transformers' Dense layer: ``activation(linear(x))`` (its weights are ``linear.*``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "Tanh") -> None:
        super().__init__()
        if activation not in DENSE_ACTIVATIONS:
            raise ValueError(f"Dense activation {activation!r} is not supported: expected one of "
                             f"{', '.join(DENSE_ACTIVATIONS)}")
        self.linear = torch.nn.Linear(in_features, out_features, bias=bias)
        self.activation = getattr(torch.nn, activation)()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(x))


class SentenceEmbedder(torch.nn.Module):
    """A sentence-transformers model as one module: encoder, pooling, Dense layers, normalisation."""

    def __init__(self, encoder: torch.nn.Module, pooling: list[str], dense: list[Dense], normalize: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = list(pooling)
        self.dense = torch.nn.ModuleList(dense)
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = torch.cat([pool(hidden, attention_mask, mode) for mode in self.pooling], dim=-1)
        for layer in self.dense:
            pooled = layer(pooled)
        return torch.nn.functional.normalize(pooled, p=2, dim=1) if self.normalize else pooled


class Logits(torch.nn.Module):
    """A transformers model with a classification head: its logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class MaskLogits(torch.nn.Module):
    """A masked language model: the logits at each text's (one) mask token, ``[texts, vocabulary]``."""

    def __init__(self, model: torch.nn.Module, mask_token_id: int) -> None:
        super().__init__()
        self.model = model
        self.mask_token_id = mask_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        # The codec checked that each text has exactly one mask token: argmax finds it with static shapes.
        position = (input_ids == self.mask_token_id).to(torch.int32).argmax(dim=1)
        return logits.gather(1, position.view(-1, 1, 1).expand(-1, 1, logits.shape[-1])).squeeze(1)
