"""The KEDA external scaler stubs (``tokenscaler/serve/_proto/``), generated from ``keda/externalscaler.proto``.

Part of ``make generate`` (:mod:`tools.generate`): runs ``grpc_tools.protoc`` (the
``grpcio-tools`` test dependency, pinned exactly) with ``-I keda`` into a temporary directory,
rewrites the gRPC module's absolute ``import externalscaler_pb2`` into a package-relative
import, and returns ``externalscaler_pb2.py``, ``externalscaler_pb2.pyi``,
``externalscaler_pb2_grpc.py`` and ``__init__.py``. The output depends only on the proto and the
grpcio-tools version, so regenerating with the same tools makes no diff.

The generated code checks its runtimes at import time: ``externalscaler_pb2`` requires a
protobuf runtime of the same major version and at least the ``Protobuf Python Version`` in its
header; ``externalscaler_pb2_grpc`` requires ``grpcio >= GRPC_GENERATED_VERSION``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

INIT = '''"""Generated KEDA external scaler stubs (from keda/externalscaler.proto); regenerate with ``make generate``.

Do not edit: ``tests/test_generated.py`` fails when these files differ from a fresh generation.
"""
'''

_ABSOLUTE_IMPORT = "import externalscaler_pb2 as externalscaler__pb2\n"
_RELATIVE_IMPORT = "from . import externalscaler_pb2 as externalscaler__pb2\n"

GENERATED_FILES = ("__init__.py", "externalscaler_pb2.py", "externalscaler_pb2.pyi", "externalscaler_pb2_grpc.py")


def generate(proto: Path) -> dict[str, str]:
    """The stub files' contents, by file name, generated from ``proto``."""
    from grpc_tools import protoc  # a build/test dependency only; the runtime needs just the output

    with tempfile.TemporaryDirectory(prefix="tokenscaler-protos-") as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{proto.parent}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(proto),
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc} on {proto}")
        files = {name: (Path(tmp) / name).read_text(encoding="utf-8") for name in GENERATED_FILES[1:]}
    grpc_module = files["externalscaler_pb2_grpc.py"]
    if grpc_module.count(_ABSOLUTE_IMPORT) != 1:
        raise RuntimeError(
            f"expected exactly one {_ABSOLUTE_IMPORT.strip()!r} in the generated gRPC module; "
            "grpcio-tools changed its output, update tools/protos.py"
        )
    files["externalscaler_pb2_grpc.py"] = grpc_module.replace(_ABSOLUTE_IMPORT, _RELATIVE_IMPORT)
    files["__init__.py"] = INIT
    return files
