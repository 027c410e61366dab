"""TorchServe's own gRPC stubs, generated at test time from the .proto files inside the installed jar.

No hand-written client: ``inference.proto`` (``Predictions``) and ``open_inference_grpc.proto``
(OIP ``ModelInfer``) are read from ``ts/frontend/model-server.jar`` and compiled with grpcio-tools;
``google/rpc/status.proto`` comes from googleapis-common-protos.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import types
import zipfile
from pathlib import Path

PROTOS = ("inference.proto", "open_inference_grpc.proto")


def jar_path() -> Path:
    import ts

    return Path(ts.__file__).parent / "frontend" / "model-server.jar"


def generate(out: Path) -> types.SimpleNamespace:
    """Compile the jar's protos into ``out`` and import them: ``inference``, ``oip`` (message and stub modules)."""
    import google.rpc.status_pb2  # noqa: F401  (its .proto lies beside it)
    import grpc_tools

    proto_dir = out / "proto"
    proto_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(jar_path()) as jar:
        for name in PROTOS:
            (proto_dir / name).write_bytes(jar.read(f"proto/{name}"))
    googleapis = Path(google.rpc.status_pb2.__file__).parents[2]
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"-I{googleapis}", f"-I{well_known}",
                    f"--python_out={out}", f"--grpc_python_out={out}", *PROTOS], check=True, cwd=proto_dir,
                   capture_output=True)
    sys.path.insert(0, str(out))
    modules = {name: importlib.import_module(name) for name in
               ("inference_pb2", "inference_pb2_grpc", "open_inference_grpc_pb2", "open_inference_grpc_pb2_grpc")}
    return types.SimpleNamespace(**modules)
