"""The checked-in stubs are exactly what ``python -m tokenscaler.serve.protos`` generates from keda/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tokenscaler.serve import protos
from tokenscaler.serve._proto import externalscaler_pb2 as pb

REPO = Path(__file__).resolve().parents[2]


def test_regenerating_the_stubs_makes_no_diff(tmp_path: Path) -> None:
    files = protos.generate()
    protos.write(files, tmp_path)
    for name in protos.GENERATED_FILES:
        assert (tmp_path / name).read_text() == (protos.OUT_DIR / name).read_text(), (
            f"{name} differs from a fresh generation: run python -m tokenscaler.serve.protos\n" + protos.diff(files)
        )
    assert protos.diff(files) == ""


def test_the_one_command_checks_in_a_subprocess() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tokenscaler.serve.protos", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_check_reports_a_stale_stub(tmp_path: Path) -> None:
    protos.write(protos.generate(), tmp_path)
    stale = tmp_path / "externalscaler_pb2_grpc.py"
    stale.write_text(stale.read_text().replace("from . import", "import"))
    assert protos.main(["--check", "--out", str(tmp_path)]) == 1


def test_the_stubs_carry_kedas_wire_contract() -> None:
    service = pb.DESCRIPTOR.services_by_name["ExternalScaler"]
    assert pb.DESCRIPTOR.package == "externalscaler"
    assert service.full_name == "externalscaler.ExternalScaler"
    methods = {m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods}
    assert methods == {
        "IsActive": ("ScaledObjectRef", "IsActiveResponse", False),
        "StreamIsActive": ("ScaledObjectRef", "IsActiveResponse", True),
        "GetMetricSpec": ("ScaledObjectRef", "GetMetricSpecResponse", False),
        "GetMetrics": ("GetMetricsRequest", "GetMetricsResponse", False),
    }
    fields = {
        name: {f.name: (f.number, f.type, f.is_repeated) for f in pb.DESCRIPTOR.message_types_by_name[name].fields}
        for name in pb.DESCRIPTOR.message_types_by_name
    }
    F = pb.DESCRIPTOR.message_types_by_name["MetricSpec"].fields_by_name["metricName"]
    STRING, BOOL, INT64, DOUBLE, MESSAGE = F.TYPE_STRING, F.TYPE_BOOL, F.TYPE_INT64, F.TYPE_DOUBLE, F.TYPE_MESSAGE
    OPT, REP = False, True
    assert fields == {
        "ScaledObjectRef": {
            "name": (1, STRING, OPT),
            "namespace": (2, STRING, OPT),
            "scalerMetadata": (3, MESSAGE, REP),
        },
        "IsActiveResponse": {"result": (1, BOOL, OPT)},
        "GetMetricSpecResponse": {"metricSpecs": (1, MESSAGE, REP)},
        "MetricSpec": {
            "metricName": (1, STRING, OPT),
            "targetSize": (2, INT64, OPT),
            "targetSizeFloat": (3, DOUBLE, OPT),
        },
        "GetMetricsRequest": {"scaledObjectRef": (1, MESSAGE, OPT), "metricName": (2, STRING, OPT)},
        "GetMetricsResponse": {"metricValues": (1, MESSAGE, REP)},
        "MetricValue": {
            "metricName": (1, STRING, OPT),
            "metricValue": (2, INT64, OPT),
            "metricValueFloat": (3, DOUBLE, OPT),
        },
    }
    metadata = pb.ScaledObjectRef.DESCRIPTOR.fields_by_name["scalerMetadata"]
    assert metadata.message_type.GetOptions().map_entry
