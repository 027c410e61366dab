"""The baseline: TorchServe's BaseHandler serving the eager model, with only the minimal JSON
preprocess/postprocess that TorchServe's custom-handler documentation shows (batch-aware)."""

import torch
from ts.torch_handler.base_handler import BaseHandler


class StockHandler(BaseHandler):
    """Body (a nested list) -> one float tensor per request, concatenated; output rows -> lists."""

    def preprocess(self, data):
        rows = []
        for row in data:
            body = row.get("data") or row.get("body")
            rows.append(torch.as_tensor(body, dtype=torch.float32))
        self._sizes = [len(row) for row in rows]
        return torch.cat(rows)

    def postprocess(self, inference_output):
        return [part.tolist() for part in torch.split(inference_output, self._sizes)]
