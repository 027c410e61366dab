"""Clients of one torchserve that no one here wrote: tritonclient (v2 REST, JSON and binary), TorchServe's
gRPC stubs generated from the jar's .proto files (Predictions, OIP ModelInfer), plain HTTP for KServe v1."""

import json

import grpc
import numpy as np
import tritonclient.http as triton


class Clients:
    """One torchserve's clients: tritonclient, gRPC Predictions and OIP stubs, plain HTTP for v1."""

    def __init__(self, server, stubs):
        self.server, self.stubs = server, stubs
        self.auth = {"Authorization": f"Bearer {server.key('inference')}"}
        self.metadata = [("authorization", self.auth["Authorization"])]
        self.triton = triton.InferenceServerClient(f"127.0.0.1:{server.inference_port}", network_timeout=120)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        self.predictions = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)
        self.oip = stubs.open_inference_grpc_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def rest(self, model, body):
        status, answer = self.server.predict(model, json.dumps(body))
        assert status == 200, answer
        return answer

    def v1(self, model, body):
        status, raw = self.server.request(self.server.inference_port, "POST", f"/v1/models/{model}:predict",
                                          json.dumps(body).encode(), {**self.auth, "Content-Type": "application/json"})
        return status, json.loads(raw)

    def v2(self, model, inputs, binary, outputs=None, request_id=""):
        """tritonclient: every input as JSON data or as binary; outputs binary the same way."""
        tensors = []
        for name, value, datatype in inputs:
            tensor = triton.InferInput(name, list(value.shape), datatype)
            tensor.set_data_from_numpy(value, binary_data=binary)
            tensors.append(tensor)
        requested = [triton.InferRequestedOutput(name, binary_data=binary) for name in outputs or []]
        # A copy: tritonclient adds Inference-Header-Content-Length to the dict it is given.
        return self.triton.infer(model, tensors, outputs=requested or None, headers=dict(self.auth),
                                 request_id=request_id)

    def grpc_predictions(self, model, body: bytes):
        request = self.stubs.inference_pb2.PredictionsRequest(model_name=model, input={"data": body})
        return json.loads(self.predictions.Predictions(request, metadata=self.metadata, timeout=120).prediction)

    def model_infer(self, model, inputs, request_id="", raw=False):
        """OIP ModelInfer with typed contents (or, with ``raw``, raw_input_contents)."""
        oip = self.stubs.open_inference_grpc_pb2
        field = {"FP32": "fp32_contents", "INT64": "int64_contents", "BYTES": "bytes_contents"}
        request = oip.ModelInferRequest(model_name=model, id=request_id)
        for name, value, datatype in inputs:
            tensor = request.inputs.add(name=name, datatype=datatype, shape=list(value.shape))
            if raw:
                request.raw_input_contents.append(value.tobytes())
            elif datatype == "BYTES":
                tensor.contents.bytes_contents.extend(item.encode() for item in value.flatten())
            else:
                getattr(tensor.contents, field[datatype]).extend(value.flatten().tolist())
        return self.oip.ModelInfer(request, metadata=self.metadata, timeout=120)


def oip_outputs(response):
    return {o.name: np.asarray(o.contents.fp32_contents, dtype=np.float32).reshape(list(o.shape))
            for o in response.outputs}


