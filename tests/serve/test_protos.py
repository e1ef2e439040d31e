"""The checked-in stubs carry KEDA's wire contract (that they are exactly what ``make generate``
makes from keda/externalscaler.proto is tests/test_generated.py's)."""

from __future__ import annotations

from tokenscaler.serve._proto import externalscaler_pb2 as pb


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
