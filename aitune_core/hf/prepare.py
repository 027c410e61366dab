"""Archive time: a Hugging Face folder as a module, samples, and the files a worker needs.

``prepare`` reads and checks the folder, loads the task module with its weights, and tokenizes
the sample texts (built in, or ``--sample-texts``) into the samples that the backend is built,
gated and tuned on. The archive then stores the folder's config and tokenizer (``write_files``),
never its weight files: the backend's checkpoint holds the weights.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch

from aitune_core.graph_spec import Sample
from aitune_core.hf.codec import HFCodec, HFOptions
from aitune_core.hf.folder import FolderSpec, load_module, model_folder, read_folder
from aitune_core.hf.texts import SAMPLE_TEXTS, read_sample_texts, with_one_mask
from aitune_core.hf.answers import score_function

# What a worker imports beyond torch (pinned in the archive's requirements.txt).
PACKAGES = ("transformers", "tokenizers", "safetensors", "huggingface_hub")
# Texts of up to this many tokens form the first sample, which the tuner times: a typical request.
TYPICAL_TOKENS = 64


@dataclasses.dataclass
class Prepared:
    """A folder ready to build: the task module (fp32, weights loaded), samples, and what the manifest records."""

    folder: Path
    spec: FolderSpec
    module: torch.nn.Module
    samples: list[Sample]
    codec: HFCodec
    check_text: str  # one text that must go through the built backend before packing

    def model_section(self) -> dict[str, Any]:
        """The manifest's ``model`` entry: enough to remake the module from the archived config."""
        return {"hf": self.spec.to_dict()}

    def request_section(self) -> dict[str, Any]:
        return self.codec.options.to_dict()

    def write_files(self, directory: Path) -> list[Path]:
        """config.json and the tokenizer's files, written into ``directory`` (flat, as the archive holds them)."""
        config = directory / "config.json"
        shutil.copyfile(model_folder(self.folder) / "config.json", config)
        saved = self.codec.tokenizer.save_pretrained(str(directory))
        return [config, *sorted({Path(path) for path in saved if Path(path).is_file()})]


def prepare(folder: Path, task: str | None, sample_texts: Path | None, max_tokens: int | None,
            max_texts: int | None) -> Prepared:
    """Read ``folder``, load its task module, tokenize the samples; ArchiveError naming any problem."""
    folder = Path(folder)
    spec, config, tokenizer = read_folder(folder, task)
    if max_tokens is not None:
        spec.max_tokens = min(spec.max_tokens, max_tokens)
    module = load_module(folder, spec)
    labels = [str(config.id2label[index]) for index in range(len(config.id2label))] \
        if spec.task in ("text-classification", "token-classification") else []
    options = HFOptions(task=spec.task, max_tokens=spec.max_tokens, labels=labels,
                        scores=score_function(config.to_dict()), mask_token_id=spec.mask_token_id)
    if max_texts is not None:
        options.max_texts = max_texts
    codec = HFCodec(options, tokenizer)
    texts = read_sample_texts(sample_texts) if sample_texts is not None else list(SAMPLE_TEXTS)
    if spec.task == "fill-mask":
        texts = with_one_mask(texts, tokenizer.mask_token)
    return Prepared(folder=folder, spec=spec, module=module, samples=samples_of(codec, texts), codec=codec,
                    check_text=with_one_mask(["A sentence to check the text path."], tokenizer.mask_token)[0]
                    if spec.task == "fill-mask" else "A sentence to check the text path.")


def samples_of(codec: HFCodec, texts: list[str]) -> list[Sample]:
    """The texts as samples: the typical ones together (the tuner times this first one), the long ones
    together, and one short text alone, so that batch and length are dynamic when served."""
    lengths = [len(ids) for ids in codec.tokenizer(texts, truncation=True, max_length=codec.options.max_tokens)["input_ids"]]
    typical = [text for text, length in zip(texts, lengths) if length <= TYPICAL_TOKENS]
    long = [text for text, length in zip(texts, lengths) if length > TYPICAL_TOKENS]
    shortest = min(texts, key=len)
    groups = [group for group in (typical, long, [shortest]) if group]
    return [codec.sample(codec.tokenize(group)) for group in groups]
