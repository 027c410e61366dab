"""Hugging Face model folders: a folder in, a task module and its answers out.

- ``folder``: read and check a folder (config, weights, tokenizer, sentence-transformers modules),
  pick its task, load it with its weights (archive time) or empty from its config (worker start);
- ``modules``: the ``nn.Module`` each task wraps around a transformers model, ``forward(input_ids,
  attention_mask)`` so every backend builds, compiles and checks it like any other model;
- ``answers``: the tensors of a batch turned into what transformers' pipelines answer
  (labels, entities with offsets, fills);
- ``codec``: texts in, a task's answers out, for every wire format;
- ``texts``: the built-in sample texts of the accuracy gate.

``text-generation`` (causal language models) reads its folder here too, then goes to
``aitune_core.generate``.

Never ``trust_remote_code``: only architectures transformers itself defines are loaded.
"""

TASKS = ("sentence-embeddings", "text-classification", "token-classification", "fill-mask", "text-generation")
GENERATION = "text-generation"  # served by aitune_core.generate: a decoder, an engine, many steps a request
