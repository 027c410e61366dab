"""Read a Hugging Face model folder, pick its task, and make the task's module.

At archive time ``read_folder`` checks everything a worker will need (config, weights, tokenizer,
sentence-transformers' modules) and ``load_module`` loads the weights; the archive then carries the
config and tokenizer files, and the weights as the backend's checkpoint. At worker start
``empty_module`` makes the same module from the archived config alone: the checkpoint fills it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from aitune_core.errors import ArchiveError
from aitune_core.hf import GENERATION, TASKS
from aitune_core.hf.modules import POOLING_MODES, Dense, Logits, MaskLogits, SentenceEmbedder

logger = logging.getLogger(__name__)

# task -> (the architecture suffix that carries its head, transformers' Auto class)
TASK_HEADS = {
    "sentence-embeddings": (None, "AutoModel"),
    "text-classification": ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    "token-classification": ("ForTokenClassification", "AutoModelForTokenClassification"),
    "fill-mask": ("ForMaskedLM", "AutoModelForMaskedLM"),
    GENERATION: ("ForCausalLM", "AutoModelForCausalLM"),
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# A tokenizer's vocabulary comes in one of these (transformers would otherwise make an empty one).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
# A tokenizer without a set limit reports ~1e30: the model's positions decide then.
_UNSET_LIMIT = 1_000_000
_DEFAULT_LIMIT = 512


@dataclasses.dataclass
class FolderSpec:
    """What a worker needs to remake the task module from the archived config (the manifest's ``model.hf``)."""

    task: str
    architecture: str
    max_tokens: int
    pooling: list[str] = dataclasses.field(default_factory=list)  # sentence-embeddings
    dense: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # sentence-embeddings' Dense layers
    normalize: bool = False
    mask_token_id: int | None = None  # fill-mask

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> "FolderSpec":
        return cls(**spec)


def model_folder(folder: Path) -> Path:
    """Where the transformers model lies: ``folder``, or the Transformer module's own folder that older
    sentence-transformers layouts name in modules.json (``0_Transformer/``)."""
    folder = Path(folder)
    if (folder / "config.json").is_file() or not (folder / "modules.json").is_file():
        return folder
    for entry in _read_json(folder / "modules.json", "sentence-transformers' modules"):
        if str(entry.get("type", "")).rsplit(".", 1)[-1] == "Transformer" and entry.get("path"):
            return folder / entry["path"]
    return folder


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArchiveError(f"{path} ({what}) is not valid JSON: {error}") from None


def _config(folder: Path):
    """transformers' config of ``folder``; refuses remote code and architectures transformers does not know."""
    path = folder / "config.json"
    if not path.is_file():
        raise ArchiveError(f"--hf-model {folder} has no config.json: expected a Hugging Face model folder "
                           "(config.json, model.safetensors, tokenizer.json)")
    raw = _read_json(path, "the model's config")
    architecture = (raw.get("architectures") or [raw.get("model_type", "?")])[0]
    if raw.get("auto_map"):
        raise ArchiveError(f"--hf-model {folder}: {architecture} needs the folder's own Python code "
                           "(config.json has auto_map); aitune-archive never runs remote code (trust_remote_code)")
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ArchiveError("--hf-model needs transformers: pip install 'aitune-torchserve[hf]'") from None
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ArchiveError(f"--hf-model {folder}: transformers cannot read its config (model_type "
                           f"{raw.get('model_type')!r}, {architecture}): {reason}") from None


def _task_of(config: Any, folder: Path, task: str | None) -> str:
    """``task`` checked against the folder, or the task the folder says (modules.json, architectures)."""
    architectures = list(getattr(config, "architectures", None) or [])
    if task is not None:
        if task not in TASKS:
            raise ArchiveError(f"--task {task!r} is not one of {', '.join(TASKS)}")
        suffix = TASK_HEADS[task][0]
        if suffix is not None and not any(name.endswith(suffix) for name in architectures):
            raise ArchiveError(f"--task {task} does not fit {folder}: it needs a *{suffix} model, the folder holds "
                               f"{', '.join(architectures) or 'no architectures entry'}")
        return task
    if (folder / "modules.json").is_file():
        return "sentence-embeddings"
    for name in architectures:
        for candidate, (suffix, _) in TASK_HEADS.items():
            if suffix is not None and name.endswith(suffix):
                return candidate
    if architectures and not any("For" in name for name in architectures):
        return "sentence-embeddings"  # a bare encoder: mean pooling, as sentence-transformers does for one
    raise ArchiveError(f"{folder}: cannot tell the task from {', '.join(architectures) or 'a config without architectures'}"
                       f": name it with --task ({', '.join(TASKS)})")


def _weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ArchiveError(f"--hf-model {folder} has no weights: expected one of {', '.join(WEIGHT_FILES)}")


def _sentence_transformer_modules(folder: Path) -> tuple[list[str], list[dict[str, Any]], bool]:
    """Pooling modes, Dense layers and normalisation from modules.json; mean pooling when there is none."""
    path = folder / "modules.json"
    if not path.is_file():
        return ["mean"], [], False
    pooling, dense, normalize = None, [], False
    for entry in _read_json(path, "sentence-transformers' modules"):
        kind = str(entry.get("type", "")).rsplit(".", 1)[-1]
        where = folder / entry.get("path", "")
        if kind == "Transformer":
            continue
        if kind == "Pooling":
            pooling = _pooling_modes(_read_json(where / "config.json", "the pooling config"), where)
        elif kind == "Dense":
            dense.append(_dense_layer(where))
        elif kind == "Normalize":
            normalize = True
        else:
            raise ArchiveError(f"{path}: module {entry.get('type')!r} is not supported: expected Transformer, Pooling, "
                               "Dense and Normalize")
    return pooling or ["mean"], dense, normalize


def _pooling_modes(config: dict[str, Any], where: Path) -> list[str]:
    if "pooling_mode" in config:
        modes = config["pooling_mode"]
        modes = [modes] if isinstance(modes, str) else list(modes)
    else:  # older folders: one boolean per mode
        legacy = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
                  "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
                  "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}
        modes = [mode for mode, key in legacy.items() if config.get(key)]
    unknown = [mode for mode in modes if mode not in POOLING_MODES]
    if unknown or not modes:
        raise ArchiveError(f"{where}/config.json: pooling {modes!r} is not supported: expected some of "
                           f"{', '.join(POOLING_MODES)}")
    return [mode for mode in POOLING_MODES if mode in modes]


def _dense_layer(where: Path) -> dict[str, Any]:
    config = _read_json(where / "config.json", "a Dense layer's config")
    return {"in_features": int(config["in_features"]), "out_features": int(config["out_features"]),
            "bias": bool(config.get("bias", True)),
            "activation": str(config.get("activation_function", "torch.nn.modules.activation.Tanh")).rsplit(".", 1)[-1]}


def _dense_weights(where: Path) -> dict[str, torch.Tensor]:
    if (where / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(where / "model.safetensors"))
    return _torch_load(where / "pytorch_model.bin")


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ArchiveError(f"{path.parent} has no weights: expected model.safetensors or pytorch_model.bin") from None
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[-1]
        raise ArchiveError(f"{path} cannot be read with torch.load(weights_only=True): {reason}") from None


def load_tokenizer(folder: Path):
    """The folder's fast tokenizer (transformers'); ArchiveError when it has none (offsets need a fast one)."""
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ArchiveError(f"--hf-model {folder} has no tokenizer transformers can load: expected one of "
                           f"{', '.join(TOKENIZER_FILES)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ArchiveError(f"--hf-model {folder} has no tokenizer transformers can load (tokenizer.json, or "
                           f"tokenizer_config.json with its vocabulary): {reason}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ArchiveError(f"--hf-model {folder}: its tokenizer ({type(tokenizer).__name__}) is not a fast "
                           "(tokenizers) one: save one with tokenizer.json")
    return tokenizer


def _limit(tokenizer: Any, config: Any, folder: Path, task: str) -> int:
    """The most tokens a text keeps: the tokenizer's limit, else the model's positions; sentence-transformers' own
    max_seq_length for an embedding model."""
    limit = getattr(tokenizer, "model_max_length", None)
    if not isinstance(limit, int) or limit <= 0 or limit >= _UNSET_LIMIT:
        limit = min(getattr(config, "max_position_embeddings", _DEFAULT_LIMIT) or _DEFAULT_LIMIT, _DEFAULT_LIMIT)
    bert_config = next((path for path in (folder / "sentence_bert_config.json",
                                          model_folder(folder) / "sentence_bert_config.json") if path.is_file()), None)
    if task == "sentence-embeddings" and bert_config is not None:
        limit = min(limit, int(_read_json(bert_config, "sentence-transformers' config").get("max_seq_length") or limit))
    return limit


def task_of(folder: Path, task: str | None = None) -> str:
    """The task ``folder`` serves (``task`` checked against it, or read from it); ArchiveError naming the problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArchiveError(f"--hf-model {folder} is not a folder")
    task = _task_of(_config(model_folder(folder)), folder, task)
    _weights_file(model_folder(folder))
    return task


def read_folder(folder: Path, task: str | None = None) -> tuple[FolderSpec, Any, Any]:
    """Check ``folder`` and say what it serves: (spec, transformers config, tokenizer); ArchiveError naming the problem."""
    folder = Path(folder)
    task = task_of(folder, task)
    if task == GENERATION:
        raise ArchiveError(f"{folder} holds a causal language model: read it with aitune_core.generate")
    config = _config(model_folder(folder))
    tokenizer = load_tokenizer(model_folder(folder))
    architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    spec = FolderSpec(task=task, architecture=architecture, max_tokens=_limit(tokenizer, config, folder, task))
    if task == "sentence-embeddings":
        spec.pooling, spec.dense, spec.normalize = _sentence_transformer_modules(folder)
    if task == "fill-mask":
        if tokenizer.mask_token_id is None:
            raise ArchiveError(f"--hf-model {folder}: its tokenizer has no mask token, which fill-mask needs")
        spec.mask_token_id = int(tokenizer.mask_token_id)
    if task in ("text-classification", "token-classification") and not getattr(config, "id2label", None):
        raise ArchiveError(f"--hf-model {folder}: config.json has no id2label for the {task} labels")
    return spec, config, tokenizer


def _wrap(spec: FolderSpec, model: torch.nn.Module, dense_weights: list[dict[str, torch.Tensor]] | None = None) -> torch.nn.Module:
    if spec.task == "sentence-embeddings":
        dense = [Dense(**layer) for layer in spec.dense]
        for layer, weights in zip(dense, dense_weights or []):
            layer.load_state_dict(weights)
        return SentenceEmbedder(model, spec.pooling, dense, spec.normalize)
    if spec.task == "fill-mask":
        return MaskLogits(model, spec.mask_token_id)
    return Logits(model)


def load_module(folder: Path, spec: FolderSpec) -> torch.nn.Module:
    """The task module with the folder's weights (fp32, eval mode); ArchiveError when weights are missing."""
    import transformers

    auto = getattr(transformers, TASK_HEADS[spec.task][1])
    try:
        model, info = auto.from_pretrained(model_folder(folder), local_files_only=True, trust_remote_code=False,
                                           dtype=torch.float32,
                                           weights_only=True, output_loading_info=True)
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        weights = _weights_file(model_folder(folder))
        if weights.suffix == ".bin" or weights.name.endswith(".bin.index.json"):
            raise ArchiveError(f"{weights} cannot be read with torch.load(weights_only=True) (or does not fit the "
                               f"config): {reason}") from None
        raise ArchiveError(f"--hf-model {folder}: transformers cannot load the weights: {reason}") from None
    missing = [key for key in info.get("missing_keys", []) if "position_ids" not in key]
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (" ..." if len(missing) > 5 else "")
        raise ArchiveError(f"--hf-model {folder}: the weights lack {len(missing)} tensor(s) the {spec.task} model needs "
                           f"({shown}): is it a {TASK_HEADS[spec.task][0] or 'base'} model?")
    dense_weights = [_dense_weights(Path(folder) / entry) for entry in _dense_paths(Path(folder))]
    return _wrap(spec, model, dense_weights).eval().requires_grad_(False)


def _dense_paths(folder: Path) -> list[str]:
    path = folder / "modules.json"
    if not path.is_file():
        return []
    return [entry.get("path", "") for entry in _read_json(path, "sentence-transformers' modules")
            if str(entry.get("type", "")).rsplit(".", 1)[-1] == "Dense"]


def empty_module(model_dir: Path, spec: FolderSpec) -> torch.nn.Module:
    """The task module made from the archived config.json, with initial weights that the checkpoint replaces."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    auto = getattr(transformers, TASK_HEADS[spec.task][1])
    return _wrap(spec, auto.from_config(config, trust_remote_code=False)).eval()
