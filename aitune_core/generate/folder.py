"""A causal language model's Hugging Face folder as a ``Decoder``: checked, configured and loaded.

Llama-family architectures take this path (one decoder implementation, a static KV cache): other
causal LMs are refused with a line that says which architectures are served. Never ``trust_remote_code``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from aitune_core.errors import ArchiveError
from aitune_core.generate.decoder import Decoder, DecoderConfig

logger = logging.getLogger(__name__)

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
DEFAULT_MAX_CONTEXT = 2048
DEFAULT_MAX_BATCH = 8
# Rotary types whose frequencies change with the sequence's length: a static cache cannot follow them.
DYNAMIC_ROPE = ("dynamic", "longrope")


def decoder_config(config: Any, folder: Path, max_context: int | None, max_batch: int | None) -> DecoderConfig:
    """The decoder's shape from transformers' ``config``; ArchiveError for what this decoder does not do."""
    architecture = (getattr(config, "architectures", None) or ["?"])[0]
    if architecture not in ARCHITECTURES:
        raise ArchiveError(f"--hf-model {folder}: {architecture} is not served for text generation: supported are "
                           f"{', '.join(ARCHITECTURES)} (Llama-family decoders)")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ArchiveError(f"--hf-model {folder}: hidden_act {config.hidden_act!r} is not supported (expected silu)")
    rope = (getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) in DYNAMIC_ROPE:
        raise ArchiveError(f"--hf-model {folder}: rope type {rope.get('rope_type')!r} changes with the sequence "
                           "length, which a static KV cache cannot follow")
    limit = int(config.max_position_embeddings)
    context = max_context or min(limit, DEFAULT_MAX_CONTEXT)
    if not 2 <= context <= limit:
        raise ArchiveError(f"--max-context must be between 2 and the model's {limit} positions, got {context}")
    window = getattr(config, "sliding_window", None)
    uses_window = window and (architecture != "Qwen2ForCausalLM" or getattr(config, "use_sliding_window", False))
    if uses_window and window < context:
        logger.warning("%s attends to a sliding window of %d tokens: max_context capped to it", architecture, window)
        context = int(window)
    batch = max_batch or DEFAULT_MAX_BATCH
    if batch < 1:
        raise ArchiveError(f"--max-batch must be at least 1, got {batch}")
    heads = config.num_attention_heads
    qwen2 = architecture == "Qwen2ForCausalLM"
    return DecoderConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        rms_norm_eps=config.rms_norm_eps, max_context=context, max_batch=batch,
        attention_bias=qwen2 or bool(getattr(config, "attention_bias", False)),
        attention_out_bias=not qwen2 and bool(getattr(config, "attention_bias", False)),
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)))


def load_decoder(folder: Path, max_context: int | None, max_batch: int | None) -> tuple[Decoder, list[int]]:
    """The folder's weights in a ``Decoder`` (fp32, eval), and the end-of-sequence ids its generation config names."""
    import transformers

    # The shape is checked from the config first: an unserved architecture is named before its weights load.
    config = decoder_config(transformers.AutoConfig.from_pretrained(folder, local_files_only=True,
                                                                    trust_remote_code=False),
                            folder, max_context, max_batch)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False, dtype=torch.float32, weights_only=True)
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ArchiveError(f"--hf-model {folder}: transformers cannot load the causal LM: {reason}") from None
    rotary = model.model.rotary_emb
    config.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))
    decoder = Decoder(config)
    missing, unexpected = decoder.load_state_dict(model.state_dict(), strict=False)
    missing = [key for key in missing if key != "rope_inv_freq"]
    if missing or unexpected:
        names = ", ".join((missing + unexpected)[:5])
        raise ArchiveError(f"--hf-model {folder}: the weights do not fit a Llama-family decoder ({len(missing)} "
                           f"missing, {len(unexpected)} unexpected: {names})")
    with torch.no_grad():
        decoder.rope_inv_freq.copy_(rotary.inv_freq.float())
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return decoder.eval().requires_grad_(False), [int(token) for token in eos]


def empty_decoder(spec: dict[str, Any]) -> Decoder:
    """A decoder of the archived shape; the checkpoint fills its weights and rotary frequencies."""
    return Decoder(DecoderConfig.from_dict(spec)).eval()
