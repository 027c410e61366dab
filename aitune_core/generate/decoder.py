"""A Llama-family decoder with a static KV cache: one forward is one prompt chunk or one decode step.

Written for generation in the style of gpt-fast: plain modules, the KV cache allocated once as
``[max_batch, kv_heads, max_context, head_dim]`` buffers per layer, fp32 or bf16 (``kv_cache_dtype``; never saved
in a checkpoint), and
``forward(tokens, positions, slots)``:

- ``tokens``, ``positions``: ``[batch, length]``: a prompt chunk (batch 1) or one decode step (length 1)
  of every live sequence; ``slots``: ``[batch]``, the cache slot each row writes and reads;
- ``window`` (optional): ``[batch, L]``, each row ``arange(L)``: the cache positions the rows attend to, ``L``
  past the last position of every row: attention reads ``L`` positions of each slot, not the whole context
  (the caller rounds ``L`` up, ``window_for``); without it, all ``max_context``. On a CPU in fp32 the kernel
  ``aitune::cached_attention`` reads each row's slot where it lies, as far as the row's own position, and the
  window is not needed;
- returns the logits ``[batch, length, vocabulary]``.

Each row writes its keys and values at its positions in its slot, then attends to every cached position
up to its own: what lies beyond (a longer sequence that used the slot before, a padded chunk's tail) is
masked until it is overwritten. So sequences join and leave slots between steps, and shapes never depend
on how long a sequence is: one compiled graph serves every prompt length and number of live sequences.
Parameter names are the Hugging Face checkpoints' (``model.layers.N.self_attn.q_proj.weight``...), so a
folder's weights load as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from aitune_core.kernels import ops


@dataclasses.dataclass
class DecoderConfig:
    """The shape of a Llama-family decoder, read from a folder's config.json (see ``folder.decoder_config``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_context: int
    max_batch: int
    attention_bias: bool = False  # q/k/v projections (Qwen2: True)
    attention_out_bias: bool = False  # o projection
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    rope_scaling: float = 1.0  # transformers' attention_scaling of the rotary embedding (YaRN...); 1 otherwise
    kv_cache_dtype: str = "float32"  # KV_CACHE_DTYPES; archives made before the choice existed hold fp32

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DecoderConfig":
        return cls(**values)


# What the KV cache may hold: float32 (the activations' dtype, the default), or bfloat16: half the memory, and
# half the bytes a decode step reads from it (at 8 streams of a few hundred tokens, a third of a 254M int8
# decoder's bytes a step); keys and values are rounded to bf16 as they are written and attention sums in fp32.
KV_CACHE_DTYPES = ("float32", "bfloat16")
WINDOW_STEP = 64  # attention windows are whole multiples of this: few shapes, at most 63 positions read for nothing


def window_for(last_position: int, max_context: int, rows: int = 1) -> torch.Tensor:
    """The ``window`` of a forward of ``rows`` rows ending at ``last_position`` at most: past it, rounded up to a
    multiple of WINDOW_STEP, never past the context. One more than needed, so that a prompt chunk's window never
    has the chunk's length (a compiled graph would tie the two sizes together and recompile for decode steps)."""
    span = -(-(last_position + 2) // WINDOW_STEP) * WINDOW_STEP
    return torch.arange(min(span, max_context)).repeat(rows, 1)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, heads * head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_heads * head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(heads * head_dim, config.hidden_size, bias=config.attention_out_bias)
        self.allocate_cache(config.kv_cache_dtype)

    def allocate_cache(self, dtype: str) -> None:
        """Empty key and value caches of the config's shape in ``dtype``, where the weights are."""
        config = self.config
        shape = (config.max_batch, config.num_kv_heads, config.max_context, config.head_dim)
        options = {"dtype": getattr(torch, dtype), "device": self.q_proj.weight.device}
        self.register_buffer("k_cache", torch.zeros(shape, **options), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, **options), persistent=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        head_dim = self.config.head_dim
        q = self.q_proj(x).view(batch, length, self.config.num_heads, head_dim)
        k = self.k_proj(x).view(batch, length, self.config.num_kv_heads, head_dim)
        v = self.v_proj(x).view(batch, length, self.config.num_kv_heads, head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # One flat index per (slot, kv head, position): index_copy_ keeps the batch size symbolic where a
        # multi-tensor index_put would make dynamo specialize it.
        kv_heads, context = self.config.num_kv_heads, self.config.max_context
        rows = slots.view(-1, 1, 1) * kv_heads + torch.arange(kv_heads, device=slots.device).view(1, -1, 1)
        flat = (rows * context + positions.unsqueeze(1)).reshape(-1)  # [batch * kv_heads * length]
        for cache, new in ((self.k_cache, k), (self.v_cache, v)):
            cache.view(-1, head_dim).index_copy_(0, flat, new.transpose(1, 2).reshape(-1, head_dim).to(cache.dtype))
        if q.device.type == "cpu" and q.dtype == torch.float32:
            # On a CPU the kernel reads each row's keys and values where they lie, only up to its own position.
            out = ops.cached_attention(q, self.k_cache, self.v_cache, slots, positions)
        else:
            out = ops.gathered_attention(q, self.k_cache, self.v_cache, slots, mask)
        return self.o_proj(out.reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, slots, positions, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    """``model.*`` in the checkpoints: embeddings, layers, final norm."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Decoder(nn.Module):
    """The whole decoder: ``forward(tokens, positions, slots) -> logits``."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # The rotary frequencies come from transformers for the folder's rope type (saved with the weights).
        self.register_buffer("rope_inv_freq", torch.zeros(config.head_dim // 2))
        self.register_buffer("context_positions", torch.arange(config.max_context), persistent=False)

    def use_kv_cache(self, dtype: str) -> None:
        """Hold the KV cache in ``dtype`` (one of KV_CACHE_DTYPES) from now on, empty (the config says so once every
        layer holds it: a failed allocation leaves the config naming the dtype it had)."""
        if dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {dtype!r}")
        for layer in self.model.layers:
            layer.self_attn.allocate_cache(dtype)
        self.config.kv_cache_dtype = dtype

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                window: torch.Tensor | None = None) -> torch.Tensor:
        x = self.model.embed_tokens(tokens)
        angles = positions.unsqueeze(-1).float() * self.rope_inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1)
        cos = (angles.cos() * self.config.rope_scaling).to(x.dtype).unsqueeze(2)  # [batch, length, 1, head_dim]
        sin = (angles.sin() * self.config.rope_scaling).to(x.dtype).unsqueeze(2)
        window = self.context_positions.view(1, -1) if window is None else window
        mask = window.unsqueeze(1) <= positions.unsqueeze(-1)  # [batch, length, span]
        for layer in self.model.layers:
            x = layer(x, cos, sin, slots, positions, mask)
        return self.lm_head(self.model.norm(x))
