"""A task's tensors turned into what transformers' pipelines answer, text by text.

Written from the pipelines' documented behaviour (transformers 5): the same labels, scores,
entity grouping (``aggregation_strategy="simple"``), character offsets and fills, so that an answer
can be held against ``pipeline(...)`` on the same folder.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values - values.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def score_function(config: dict[str, Any]) -> str:
    """``softmax``, ``sigmoid`` or ``none``: how text-classification turns logits into scores (the pipeline's rule)."""
    problem = config.get("problem_type")
    if problem == "regression":
        return "none"
    if problem == "multi_label_classification" or config.get("num_labels") == 1:
        return "sigmoid"
    return "softmax"


def class_scores(logits: np.ndarray, function: str) -> np.ndarray:
    """Scores per label of ``[texts, labels]`` logits (float32)."""
    logits = logits.astype(np.float32, copy=False)
    if function == "softmax":
        return _softmax(logits)
    if function == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    return logits


def classification(scores: np.ndarray, labels: list[str], ranked: bool = False,
                   top_k: int | None = None) -> list[dict[str, Any]]:
    """Per text ``{"label", "score"}``; ``ranked`` adds ``scores``: every label's (best first), or the best ``top_k``."""
    answers = []
    for row in scores:
        best = int(row.argmax())
        answer: dict[str, Any] = {"label": labels[best], "score": float(row[best])}
        if ranked:
            ranked = sorted(({"label": labels[i], "score": float(s)} for i, s in enumerate(row)),
                            key=lambda item: item["score"], reverse=True)
            answer["scores"] = ranked if top_k is None else ranked[:top_k]
        answers.append(answer)
    return answers


def _tag(label: str) -> tuple[str, str]:
    """(B or I, the entity type) of an IOB label; a label without a prefix continues its type."""
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label


def entities(text: str, token_ids: list[int], offsets: list[tuple[int, int]], special: list[int], logits: np.ndarray,
             labels: list[str], tokenizer: Any, ignore: tuple[str, ...] = ("O",)) -> list[dict[str, Any]]:
    """One text's entities, grouped as the token-classification pipeline's ``aggregation_strategy="simple"``.

    ``logits`` is ``[tokens, labels]`` for the text's tokens (padding included, skipped via ``special``).
    """
    scores = _softmax(logits.astype(np.float32, copy=False))
    tokens = []
    for index, token_id in enumerate(token_ids):
        if special[index]:
            continue
        start, end = offsets[index]
        word = text[start:end] if token_id == tokenizer.unk_token_id else tokenizer.convert_ids_to_tokens(token_id)
        best = int(scores[index].argmax())
        tokens.append({"entity": labels[best], "score": scores[index][best], "word": word, "start": start, "end": end})
    groups: list[list[dict[str, Any]]] = []
    for token in tokens:
        if groups:
            bi, tag = _tag(token["entity"])
            if tag == _tag(groups[-1][-1]["entity"])[1] and bi != "B":
                groups[-1].append(token)
                continue
        groups.append([token])
    found = []
    for group in groups:
        entity_group = group[0]["entity"].split("-", 1)[-1]
        if entity_group in ignore:
            continue
        found.append({"entity_group": entity_group, "score": float(np.mean([token["score"] for token in group])),
                      "word": tokenizer.convert_tokens_to_string([token["word"] for token in group]),
                      "start": int(group[0]["start"]), "end": int(group[-1]["end"])})
    return found


def fills(token_ids: list[int], logits: np.ndarray, top_k: int, mask_token_id: int, tokenizer: Any) -> list[dict[str, Any]]:
    """The best ``top_k`` tokens for one text's mask: ``{"score", "token", "token_str", "sequence"}`` as fill-mask answers."""
    probabilities = _softmax(logits.astype(np.float32, copy=False))
    best = np.argsort(-probabilities, kind="stable")[:top_k]
    ids = np.asarray(token_ids)
    mask_at = int(np.flatnonzero(ids == mask_token_id)[0])
    answers = []
    for token in best.tolist():
        filled = ids.copy()
        filled[mask_at] = token
        if tokenizer.pad_token_id is not None:
            filled = filled[filled != tokenizer.pad_token_id]
        answers.append({"score": float(probabilities[token]), "token": int(token),
                        "token_str": tokenizer.decode([token]),
                        "sequence": tokenizer.decode(filled.tolist(), skip_special_tokens=True)})
    return answers
