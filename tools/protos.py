"""Regenerates the checked-in KEDA external scaler stubs from ``keda/externalscaler.proto``.

This module owns the one command that produces ``tokenscaler/serve/_proto/``::

    python -m tokenscaler.serve.protos            # rewrite the checked-in stubs
    python -m tokenscaler.serve.protos --check    # exit 1 (with a diff) if they are out of date

It runs ``grpc_tools.protoc`` (the ``grpcio-tools`` test dependency) with ``-I keda`` into a
temporary directory, rewrites the gRPC module's absolute ``import externalscaler_pb2`` into a
package-relative import, and writes ``externalscaler_pb2.py``, ``externalscaler_pb2.pyi``,
``externalscaler_pb2_grpc.py`` and ``__init__.py``. The output depends only on the proto and the
grpcio-tools version, so regenerating with the same tools makes no diff.

The generated code checks its runtimes at import time: ``externalscaler_pb2`` requires a
protobuf runtime of the same major version and at least the ``Protobuf Python Version`` in its
header; ``externalscaler_pb2_grpc`` requires ``grpcio >= GRPC_GENERATED_VERSION``.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO = REPO / "keda" / "externalscaler.proto"
OUT_DIR = Path(__file__).resolve().parent / "_proto"

INIT = '''"""Generated KEDA external scaler stubs; regenerate with ``python -m tokenscaler.serve.protos``.

Do not edit: ``tests/serve/test_protos.py`` fails when these files differ from a fresh generation.
"""
'''

_ABSOLUTE_IMPORT = "import externalscaler_pb2 as externalscaler__pb2\n"
_RELATIVE_IMPORT = "from . import externalscaler_pb2 as externalscaler__pb2\n"

GENERATED_FILES = ("__init__.py", "externalscaler_pb2.py", "externalscaler_pb2.pyi", "externalscaler_pb2_grpc.py")


def generate(proto: Path = PROTO) -> dict[str, str]:
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
            "grpcio-tools changed its output, update tokenscaler/serve/protos.py"
        )
    files["externalscaler_pb2_grpc.py"] = grpc_module.replace(_ABSOLUTE_IMPORT, _RELATIVE_IMPORT)
    files["__init__.py"] = INIT
    return files


def write(files: dict[str, str], out_dir: Path = OUT_DIR) -> list[Path]:
    """Write ``files`` into ``out_dir`` (created if missing); returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in GENERATED_FILES:
        path = out_dir / name
        path.write_text(files[name], encoding="utf-8", newline="\n")
        written.append(path)
    return written


def diff(files: dict[str, str], out_dir: Path = OUT_DIR) -> str:
    """A unified diff from the files in ``out_dir`` to ``files``; empty when they match."""
    chunks: list[str] = []
    for name in GENERATED_FILES:
        path = out_dir / name
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != files[name]:
            chunks.extend(
                difflib.unified_diff(
                    current.splitlines(keepends=True),
                    files[name].splitlines(keepends=True),
                    fromfile=f"{path} (checked in)",
                    tofile=f"{path} (regenerated)",
                )
            )
    return "".join(chunks)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenscaler.serve.protos", description=__doc__.split("\n")[0])
    parser.add_argument("--proto", type=Path, default=PROTO, help=f"the proto file (default: {PROTO})")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output directory (default: {OUT_DIR})")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 and print a diff if out of date")
    args = parser.parse_args(argv)
    files = generate(args.proto)
    if args.check:
        d = diff(files, args.out)
        if d:
            sys.stdout.write(d)
            print(f"stubs in {args.out} are out of date: run python -m tokenscaler.serve.protos", file=sys.stderr)
            return 1
        print(f"stubs in {args.out} are up to date")
        return 0
    for path in write(files, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
