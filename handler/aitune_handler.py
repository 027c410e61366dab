"""TorchServe handler for models archived with aitune-archive.

Thin on purpose: every decision lives in the installed ``aitune_core`` (tested without a
server). torch-model-archiver copies this file into the .mar; it must define one class.
"""

import logging
import time

from aitune_core.cli import silence_import_notices

silence_import_notices()

from ts.metrics.metric_type_enum import MetricTypes  # noqa: E402
from ts.torch_handler.base_handler import BaseHandler  # noqa: E402

from aitune_core.errors import AITuneError  # noqa: E402
from aitune_core.serving import answer_batch, load_model, reply_json, serving_device  # noqa: E402

logger = logging.getLogger(__name__)


class AITuneHandler(BaseHandler):
    """Deploys the archived backend on the worker's device and answers JSON requests."""

    def initialize(self, context):
        """Verify and load the archive, deploy on ``cuda:<gpu_id>`` or the CPU, warm up once."""
        started = time.perf_counter()
        properties = context.system_properties
        device = serving_device(properties.get("gpu_id"))
        try:
            self.model = load_model(properties["model_dir"], device)
        except Exception as error:  # one clear line for any failure, not a traceback
            reason = str(error) if isinstance(error, AITuneError) else f"{type(error).__name__}: {error}"
            logger.error("AITune: cannot load model %s: %s", context.model_name, reason)
            raise RuntimeError(f"AITune: cannot load model {context.model_name}: {reason}") from None
        self.context = context
        self.batching = (properties.get("batch_size") or 1) > 1
        self.initialized = True
        notes = "".join(f"; {note}" for note in self.model.notes)
        logger.info("AITune: model %s ready: %s on %s in %.0f ms%s", context.model_name,
                    self.model.backend.describe(), device, (time.perf_counter() - started) * 1000, notes)

    def handle(self, data, context):
        """Decode and check each request, run one ``infer`` per compatible group, encode."""
        start = time.perf_counter()
        requests = [(request, _content_type(context, index)) for index, request in enumerate(data)]
        replies = answer_batch(self.model, requests)
        for index, reply in enumerate(replies):
            context.set_response_content_type(index, "application/json")
            if reply.status != 200:
                context.set_response_status(reply.status, reply.body["error"], idx=index)
        # Each metric is a log line the frontend parses (~0.25 ms a request on 2 cores): emit
        # what BaseHandler emits (HandlerTime), and the batch size only where batching is on.
        metrics = context.metrics
        if metrics is not None:
            metrics.add_time("HandlerTime", round((time.perf_counter() - start) * 1000, 2), None, "ms")
            if self.batching:
                metrics.add_metric("AITuneBatchSize", len(data), "count", metric_type=MetricTypes.HISTOGRAM)
        return [reply_json(reply) for reply in replies]


def _content_type(context, index):
    """The body's Content-Type as TorchServe recorded it, or None for a form-encoded request."""
    body_headers = context.get_request_header(index, "body")
    return body_headers.get("content-type") if isinstance(body_headers, dict) else None
