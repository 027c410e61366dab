"""TorchServe handler for models archived with aitune-archive.

Thin on purpose: every decision lives in ``aitune_core`` (tested without a server), whose copy
travels in the archive next to this file. torch-model-archiver copies this file into the .mar;
it must define one class.
"""

import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

# The archive's own aitune_core goes first, even where this project is also installed: the code
# that reads a checkpoint is the code that wrote it.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import aitune_core  # noqa: E402
from aitune_core.cli import silence_import_notices  # noqa: E402

silence_import_notices()

from ts.metrics.dimension import Dimension  # noqa: E402
from ts.metrics.metric_type_enum import MetricTypes  # noqa: E402
from ts.protocol.otf_message_handler import send_intermediate_predict_response  # noqa: E402
from ts.torch_handler.base_handler import BaseHandler  # noqa: E402
from ts.utils.util import PredictionException  # noqa: E402

from aitune_core.errors import AITuneError  # noqa: E402
from aitune_core.generate.batcher import METRICS  # noqa: E402
from aitune_core.generate.codec import GenerateCodec  # noqa: E402
from aitune_core.generate.service import GenerateService, claim_engine, is_continuous  # noqa: E402
from aitune_core.serving import answer_batch, batch_failure, load_model, serving_device, settle_heap  # noqa: E402
from aitune_core.worker_threads import set_worker_threads, threads_from_config  # noqa: E402

logger = logging.getLogger(__name__)


def _one_line_for_bad_requests(record):
    """TorchServe logs a traceback for every PredictionException; ours is a bad request: one line."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, PredictionException):
        record.msg, record.args, record.exc_info = "Bad gRPC request (%s): %s", (error.error_code, error.message), None
    return True


logging.getLogger("ts.service").addFilter(_one_line_for_bad_requests)


class AITuneHandler(BaseHandler):
    """Deploys the archived backend on the worker's device and answers every protocol TorchServe routes to it."""

    def initialize(self, context):
        """Verify and load the archive, deploy on ``cuda:<gpu_id>`` or the CPU, warm up once."""
        started = time.perf_counter()
        properties = context.system_properties
        device = serving_device(properties.get("gpu_id"))
        model_config = getattr(context, "model_yaml_config", None)
        self.context = context
        self.service = None
        # Under continuous batching the model runs on a thread of its own, from its load on: the decode steps run
        # there while TorchServe carries replies out (generate/service.py says why it must be one thread).
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="aitune-model") if is_continuous(
            model_config) else None

        def load():
            threads = set_worker_threads(threads_from_config(model_config))
            version = context.manifest["model"].get("modelVersion", "1.0")
            return threads, load_model(properties["model_dir"], device, version)

        try:
            # One worker a model batches continuously (claim_engine says why); a second refuses before loading.
            self.engine = claim_engine(properties["model_dir"], context.model_name) if self.model_thread else None
            threads, self.model = self._on_model_thread(load)
            if isinstance(self.model.codec, GenerateCodec) and self.model_thread is not None:
                # TorchServe calls handle once a decode step with every running request (see generate/service.py).
                self.service = GenerateService(self.model, self._observe, context.model_name, self.model_thread)
        except Exception as error:  # one clear line for any failure, not a traceback
            reason = str(error) if isinstance(error, AITuneError) else f"{type(error).__name__}: {error}"
            logger.error("AITune: cannot load model %s: %s", context.model_name, reason)
            raise RuntimeError(f"AITune: cannot load model {context.model_name}: {reason}") from None
        self.batching = (properties.get("batch_size") or 1) > 1 and self.service is None
        self.initialized = True
        batching = [f"continuous batching of up to {self.model.codec.options.max_batch} sequences"] if self.service else []
        settled = f"gc.freeze: {settle_heap()} objects out of full collections"  # serving.settle_heap says why
        notes = "".join(f"; {note}" for note in [threads, *batching, *self.model.notes, settled])
        logger.info("AITune: model %s ready: %s on %s in %.0f ms%s; aitune_core from %s", context.model_name,
                    self.model.backend.describe(), device, (time.perf_counter() - started) * 1000, notes,
                    os.path.dirname(aitune_core.__file__))

    def handle(self, data, context):
        """Each request in its protocol: decode and check, one ``infer`` per compatible group, encode.

        A generation archive under TorchServe's continuous batching is called once a decode step instead: each
        request's reply is this step's text, and ``ts_stream_next`` says whether TorchServe calls again for it.
        """
        start = time.perf_counter()
        requests = [(request, context.get_all_request_header(index)) for index, request in enumerate(data)]
        if self.service is not None:
            replies = self.service.step([(context.request_ids[index], request, headers)
                                         for index, (request, headers) in enumerate(requests)])
            context.stopping_criteria = [lambda _, reply=reply: None if reply.more is None else not reply.more
                                         for reply in replies]
            return self._reply(context, requests, [reply.response for reply in replies], start)
        responses = self._on_model_thread(lambda: answer_batch(
            self.model, requests, lambda index, body: send_intermediate_predict_response(
                {index: body}, {index: context.request_ids[index]}, "Intermediate response", 200, context)))
        return self._reply(context, requests, responses, start)

    def _on_model_thread(self, work):
        return work() if self.model_thread is None else self.model_thread.submit(work).result()

    def _reply(self, context, requests, responses, start):
        for index, response in enumerate(responses):
            context.set_response_content_type(index, response.content_type)
            for name, value in response.headers.items():
                context.set_response_header(index, name, value)
            if response.status != 200:
                context.set_response_status(response.status, response.error, idx=index)
        # Each metric is a log line the frontend parses (~0.25 ms a request on 2 cores): emit
        # what BaseHandler emits (HandlerTime), and the batch size only where batching is on.
        metrics = context.metrics
        if metrics is not None:
            metrics.add_time("HandlerTime", round((time.perf_counter() - start) * 1000, 2), None, "ms")
            if self.batching:
                metrics.add_metric("AITuneBatchSize", len(requests), "count", metric_type=MetricTypes.HISTOGRAM)
        failure = batch_failure(requests, responses)
        if failure is not None:  # TorchServe turns only a failed batch into a gRPC error status
            raise PredictionException(failure[1], failure[0])
        return [response.body for response in responses]

    def _observe(self, name, value, dimensions):
        """A batcher's metric as a TorchServe metric of this model (Prometheus on the metrics port)."""
        unit, kind = METRICS[name]
        named = [Dimension("ModelName", self.context.model_name), Dimension("Level", "Model"),
                 *(Dimension(key, text) for key, text in dimensions.items())]
        self.context.metrics.add_metric(name, value, unit, dimensions=named, metric_type=MetricTypes[kind])
