"""The layout aitune-kserve writes, served the way KServe's PyTorch runtime starts TorchServe.

The runtime runs ``torchserve --start --model-store=/mnt/models/model-store
--ts-config=/mnt/models/config/config.properties`` with TS_SERVICE_ENVELOPE set from the
predictor's protocol. Here the layout's own config file and model store are used, with only the
addresses moved to free loopback ports and /mnt/models to the test's folder; the models come
from its model_snapshot, each archive's requirements.txt is installed by TorchServe
(install_py_dep_per_model), and the envelope variable is set as the runtime sets it for v2.
"""

import json
import shutil

import numpy as np
import pytest
import torch
import tritonclient.http as triton

from aitune_core.kserve import KServeOptions, write_layout
from integration.torchserve import TorchServe

X = torch.randn(5, 32, generator=torch.Generator().manual_seed(31))


@pytest.fixture(scope="module")
def kserve_server(tmp_path_factory, model_store):
    root = tmp_path_factory.mktemp("kserve")
    write_layout(KServeOptions(archives=[model_store / "mlp_int8wo.mar", model_store / "two_inputs.mar"],
                               out=root / "layout", name="aitune"))
    mnt = root / "mnt" / "models"  # what the storage initializer would download
    shutil.copytree(root / "layout", mnt)
    instance = TorchServe(root / "torchserve", mnt / "model-store", {"mlp_int8wo": None, "two_inputs": None},
                          config=mnt / "config" / "config.properties", as_kserve=True,
                          env={"TS_SERVICE_ENVELOPE": "kservev2"})
    with instance.serving(timeout=300):
        yield instance


def test_layout_serves_v2_requests_like_the_archive_alone(kserve_server, server):
    client = triton.InferenceServerClient(f"127.0.0.1:{kserve_server.inference_port}", network_timeout=120)
    expected = np.asarray(server.predict("mlp_int8wo", json.dumps(X.tolist()))[1], dtype=np.float32)
    for binary in (False, True):
        tensor = triton.InferInput("x", [5, 32], "FP32")
        tensor.set_data_from_numpy(X.numpy(), binary_data=binary)
        # No token: the layout's config turns authorization off (the wrapper in the pod calls without one).
        result = client.infer("mlp_int8wo", [tensor], outputs=[triton.InferRequestedOutput("output", binary_data=binary)])
        np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=0, atol=1e-6)
    x, ids = torch.randn(2, 16), torch.randint(0, 100, (2, 6))
    inputs = [triton.InferInput("x", [2, 16], "FP32"), triton.InferInput("ids", [2, 6], "INT64")]
    inputs[0].set_data_from_numpy(x.numpy())
    inputs[1].set_data_from_numpy(ids.numpy())
    result = client.infer("two_inputs", inputs)
    projected, norms = server.predict("two_inputs", json.dumps({"inputs": [x.tolist(), ids.tolist()]}))[1]
    np.testing.assert_allclose(result.as_numpy("output_0"), projected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("output_1"), norms, rtol=0, atol=1e-6)


def test_the_wrappers_route_and_the_snapshot_settings(kserve_server):
    # KServe's wrapper forwards a v2 body to /predictions/NAME: the body, not the URL, says v2.
    body = {"id": "w1", "inputs": [{"name": "x", "shape": [1, 32], "datatype": "FP32", "data": X[0].tolist()}]}
    status, answer = kserve_server.predict("mlp_int8wo", json.dumps(body), auth=False)
    assert status == 200 and answer["id"] == "w1" and answer["outputs"][0]["shape"] == [1, 8]
    [described] = kserve_server.describe("mlp_int8wo")
    assert (described["batchSize"], described["maxBatchDelay"]) == (1, 100)
    # Each archive's requirements.txt was installed for it, and its worker used its own aitune_core.
    log = (kserve_server.logs / "ts_log.log").read_text()
    assert "Installed custom pip packages for model mlp_int8wo" in log
    assert "Installed custom pip packages for model two_inputs" in log
    assert "aitune_core from " in kserve_server.model_log()
