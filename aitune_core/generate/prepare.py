"""Archive time for text generation: a causal-LM folder as a decoder, samples, and the generation gate.

The samples are one prompt chunk and one decode step of two sequences, each with its attention window: the
shapes every ``infer`` of the archive has (a compiled backend records their dims as dynamic and compiles
one graph). The gate (``gate.py``) runs after the build, against the fp32 decoder with an fp32 KV cache (what
the folder's model computes, whatever cache the archive holds), and refuses an archive below it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from aitune_core.backend import Backend
from aitune_core.errors import ArchiveError
from aitune_core.generate import gate
from aitune_core.generate.codec import GenerateCodec
from aitune_core.generate.decoder import KV_CACHE_DTYPES, Decoder
from aitune_core.generate.engine import window
from aitune_core.generate.folder import load_decoder
from aitune_core.generate.request import GenerateOptions, parse
from aitune_core.graph_spec import Sample
from aitune_core.hf.folder import load_tokenizer

PREFILL_CHUNK = 128


@dataclasses.dataclass
class Prepared:
    folder: Path
    module: Decoder
    samples: list[Sample]
    options: GenerateOptions
    tokenizer: Any
    sequences: list[tuple[list[int], list[int]]] | None = None  # the held prompts' fp32 continuations, made once

    @contextlib.contextmanager
    def reference(self) -> Iterator[Decoder]:
        """The gate's reference: the fp32 decoder with an fp32 KV cache, for the time of the block (``module`` holds
        the archive's cache again after it: the backends built from it hold copies)."""
        dtype = self.module.config.kv_cache_dtype
        try:  # a switch that fails part-way is undone too
            self.module.use_kv_cache("float32")
            yield self.module
        finally:
            self.module.use_kv_cache(dtype)

    def model_section(self) -> dict[str, Any]:
        return {"generate": self.module.config.to_dict()}

    def write_files(self, directory: Path) -> list[Path]:
        """config.json and the tokenizer's files (the worker's decoder comes from the manifest's shape)."""
        config = directory / "config.json"
        shutil.copyfile(self.folder / "config.json", config)
        saved = self.tokenizer.save_pretrained(str(directory))
        return [config, *sorted({Path(path) for path in saved if Path(path).is_file()})]

    def measure_gate(self, infer: Callable[..., torch.Tensor], min_top1: float | None,
                     max_kl: float | None) -> gate.GenerationGate:
        """``infer`` teacher-forced against the reference on the held prompts' continuations (the defaults where
        a bound is None)."""
        with self.reference() as reference:
            if self.sequences is None:
                self.sequences = gate.continuations(reference, self.tokenizer, self.options)
            return gate.measure(reference, infer, self.sequences, self.options,
                                gate.MIN_TOP1 if min_top1 is None else min_top1,
                                gate.MAX_KL if max_kl is None else max_kl)

    def check(self, backend: Backend, progress: Callable[[str], None], min_top1: float | None,
              max_kl: float | None) -> dict[str, Any]:
        """The generation gate of the built backend, and one real request through the engine; the request section."""
        result = self.measure_gate(backend.infer, min_top1, max_kl)
        progress(f"Generation gate (teacher-forced, {len(self.sequences)} held prompts): {result.describe()}")
        if not result.passed:
            raise ArchiveError(f"Generation accuracy gate failed: {result.describe()}; try another quantization, or "
                               "accept it with --min-top1 / --max-kl")
        codec = GenerateCodec(self.options, self.tokenizer)
        [outcome] = codec.answer(backend, [codec.decode({"prompt": "Hello", "max_new_tokens": 2})])
        if outcome.status != 200:
            raise ArchiveError(f"The built decoder cannot generate: {outcome.error}")
        self.options.gate = result.to_dict()
        return self.options.to_dict()


def prepare(folder: Path, max_context: int | None, max_batch: int | None,
            kv_cache_dtype: str = "float32") -> Prepared:
    """Load the folder's decoder (fp32, its KV cache in ``kv_cache_dtype``) and tokenizer, and make the samples;
    ArchiveError naming any problem."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ArchiveError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    folder = Path(folder)
    tokenizer = load_tokenizer(folder)
    decoder, eos = load_decoder(folder, max_context, max_batch)
    decoder.use_kv_cache(kv_cache_dtype)
    if not eos and tokenizer.eos_token_id is not None:
        eos = [int(tokenizer.eos_token_id)]
    config = decoder.config
    options = GenerateOptions(max_context=config.max_context, max_batch=config.max_batch,
                              prefill_chunk=min(PREFILL_CHUNK, config.max_context), eos_token_ids=eos,
                              attention_window=True)
    prompt = parse({"prompt": gate.HELD_PROMPTS[0]}, tokenizer, options).prompt_ids[: options.prefill_chunk]
    chunk = torch.tensor([prompt + [prompt[-1]] * (options.prefill_chunk - len(prompt))])
    rows = min(2, config.max_batch)
    samples = [Sample(args=(chunk, torch.arange(options.prefill_chunk).unsqueeze(0), torch.tensor([0]),
                            *window(options, options.prefill_chunk - 1))),
               Sample(args=(torch.tensor([[prompt[-1]]] * rows), torch.tensor([[len(prompt)]] * rows),
                            torch.arange(rows), *window(options, len(prompt), rows)))]
    return Prepared(folder=folder, module=decoder, samples=samples, options=options, tokenizer=tokenizer)
