"""The KEDA external scaler over a real grpc.aio server on 127.0.0.1:0, called through the generated stubs."""

from __future__ import annotations

import asyncio
import math
import shutil
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tests.serve.builders import (
    hpa_average_value_replicas,
    keda_target,
    keda_value,
    make_config,
    make_plan,
    metrics_request,
    ref,
)
from tests.serve.harness import CALL_TIMEOUT_S, Pki, make_pki, run, sample, scaler, wait_for
from tokenscaler.config import load_config
from tokenscaler.control.store import PlanStore
from tokenscaler.core.inputs import PoolInput
from tokenscaler.core.planning import plan_interval
from tokenscaler.core.rows import build_pool_rows
from tokenscaler.core.state import PlannerState
from tokenscaler.serve import scaler_metrics as m
from tokenscaler.serve._proto import externalscaler_pb2 as pb
from tokenscaler.serve._proto import externalscaler_pb2_grpc as pb_grpc
from tokenscaler.serve.scaler import ScalerTLS, TriggerMetadata, metric_name, start_scaler

REPO = Path(__file__).resolve().parents[2]
T = CALL_TIMEOUT_S


def store_with(desired: dict[str, int], *, stale: bool = False) -> PlanStore:
    store = PlanStore()
    store.publish(make_plan(desired), published_at=1000.0, stale=stale, stale_since=990.0 if stale else None)
    return store


async def expect_error(call: Awaitable[Any], code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


# --------------------------------------------------------------------------- the HPA arithmetic


@pytest.mark.parametrize(
    "desired",
    [
        pytest.param(1, id="one-replica"),
        pytest.param(3, id="three-replicas"),
        pytest.param(10, id="ten"),
        pytest.param(11, id="eleven-which-default-tolerance-would-swallow-from-ten"),
        pytest.param(21, id="twenty-one"),
        pytest.param(22, id="twenty-two"),
        pytest.param(37, id="thirty-seven"),
    ],
)
def test_hpa_arithmetic_on_the_answers_equals_the_planned_replicas(desired: int) -> None:
    async def scenario() -> None:
        async with scaler(store_with({"alpha": desired, "beta": 2})) as s:
            spec_resp = await s.stub.GetMetricSpec(ref("alpha"), timeout=T)
            assert len(spec_resp.metricSpecs) == 1
            spec = spec_resp.metricSpecs[0]
            assert (spec.metricName, spec.targetSize, spec.targetSizeFloat) == ("tokenscaler-alpha", 1, 1.0)

            metrics = await s.stub.GetMetrics(metrics_request("alpha", spec.metricName), timeout=T)
            assert len(metrics.metricValues) == 1, "the HPA sums every value KEDA returns: exactly one"
            value = metrics.metricValues[0]
            assert value.metricValue == desired and value.metricValueFloat == float(desired)
            assert math.ceil(value.metricValueFloat / spec.targetSizeFloat) == desired
            assert math.ceil(keda_value(value) / keda_target(spec)) == desired

            # whatever the HPA runs now, AverageValue with tolerance 0 lands on the plan
            for current in (1, desired - 1, desired, desired + 1, 2 * desired):
                got = hpa_average_value_replicas(max(current, 1), [keda_value(value)], keda_target(spec), 0.0, 0.0)
                assert got == desired

            assert (await s.stub.IsActive(ref("alpha"), timeout=T)).result is True

    run(scenario())


def test_default_hpa_tolerance_would_keep_ten_replicas_at_a_plan_of_eleven() -> None:
    # why the reference ScaledObject sets tolerance "0": the 10% band swallows 10 -> 11
    assert hpa_average_value_replicas(10, [11.0], 1.0) == 10
    assert hpa_average_value_replicas(10, [11.0], 1.0, 0.0, 0.0) == 11
    assert hpa_average_value_replicas(20, [18.0], 1.0) == 20
    assert hpa_average_value_replicas(20, [18.0], 1.0, 0.0, 0.0) == 18


def test_answers_for_a_plan_of_the_example_config() -> None:
    config = load_config(REPO / "examples" / "tokenpools.yaml")
    rows = build_pool_rows(config)
    r = rows["llama-8b"]
    demand = np.zeros((r.n, 3))
    demand[r.index["research"]] = [20000.0, 300000.0, 100.0]
    demand[r.index["batch-eval"]] = [9000.0, 100000.0, 50.0]
    plan, _ = plan_interval(rows, {"llama-8b": PoolInput(2, demand)}, PlannerState(), now=0.0, interval_s=10.0)
    planned = plan.pools["llama-8b"]
    store = PlanStore()
    store.publish(plan, published_at=0.0)

    async def scenario() -> None:
        async with scaler(store) as s:
            spec = (await s.stub.GetMetricSpec(ref("llama-8b"), timeout=T)).metricSpecs[0]
            value = (await s.stub.GetMetrics(metrics_request("llama-8b"), timeout=T)).metricValues[0]
            active = (await s.stub.IsActive(ref("llama-8b"), timeout=T)).result
            assert math.ceil(keda_value(value) / keda_target(spec)) == planned.desired_replicas
            assert planned.pool.min_replicas <= planned.desired_replicas <= planned.pool.max_replicas
            assert active is planned.active() is True

    run(scenario())


def test_zero_replicas_fills_both_fields_and_is_inactive() -> None:
    async def scenario() -> None:
        async with scaler(store_with({"alpha": 0, "beta": 4})) as s:
            value = (await s.stub.GetMetrics(metrics_request("alpha"), timeout=T)).metricValues[0]
            assert (value.metricValue, value.metricValueFloat) == (0, 0.0)  # KEDA falls back to the int: also 0
            assert (await s.stub.IsActive(ref("alpha"), timeout=T)).result is False
            assert (await s.stub.IsActive(ref("beta"), timeout=T)).result is True

    run(scenario())


def test_min_replicas_keep_a_pool_active_without_demand() -> None:
    rows = build_pool_rows(make_config({"alpha": 8}, min_replicas=1))
    idle = {"alpha": PoolInput(ready_replicas=1, demand=np.zeros((rows["alpha"].n, 3)))}
    plan, _ = plan_interval(rows, idle, PlannerState(), now=0.0, interval_s=10.0)
    assert plan.pools["alpha"].desired_replicas == 1 and not plan.pools["alpha"].need.any()
    store = PlanStore()
    store.publish(plan, published_at=0.0)

    async def scenario() -> None:
        async with scaler(store) as s:
            assert (await s.stub.IsActive(ref("alpha"), timeout=T)).result is True
            assert (await s.stub.GetMetrics(metrics_request("alpha"), timeout=T)).metricValues[0].metricValue == 1

    run(scenario())


def test_stale_plan_is_still_served_and_counted() -> None:
    async def scenario() -> None:
        async with scaler(store_with({"alpha": 5}, stale=True)) as s:
            value = (await s.stub.GetMetrics(metrics_request("alpha"), timeout=T)).metricValues[0]
            assert value.metricValue == 5
            await s.stub.IsActive(ref("alpha"), timeout=T)
            assert sample(s.registry, m.STALE_ANSWERS_TOTAL, rpc="GetMetrics") == 1
            assert sample(s.registry, m.STALE_ANSWERS_TOTAL, rpc="IsActive") == 1

    run(scenario())


def test_new_plans_are_answered_without_restarting() -> None:
    async def scenario() -> None:
        async with scaler(store_with({"alpha": 3})) as s:
            assert (await s.stub.GetMetrics(metrics_request("alpha"), timeout=T)).metricValues[0].metricValue == 3
            s.store.publish(make_plan({"alpha": 11}), published_at=1010.0)
            assert (await s.stub.GetMetrics(metrics_request("alpha"), timeout=T)).metricValues[0].metricValue == 11

    run(scenario())


# --------------------------------------------------------------------------- metadata and errors


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({}, id="pool-only"),
        pytest.param({"enableTLS": "false"}, id="enableTLS"),
        pytest.param({"enableTLS": "true", "unsafeSsl": "true"}, id="enableTLS-and-unsafeSsl"),
    ],
)
def test_kedas_own_metadata_keys_are_accepted(extra: dict[str, str]) -> None:
    async def scenario() -> None:
        async with scaler(store_with({"alpha": 2})) as s:
            assert (await s.stub.IsActive(ref("alpha", **extra), timeout=T)).result is True
            assert (await s.stub.GetMetrics(metrics_request("alpha", **extra), timeout=T)).metricValues[0].metricValue

    run(scenario())


RPC_CALLS = {
    "IsActive": lambda stub, pool, extra: stub.IsActive(ref(pool, **extra), timeout=T),
    "GetMetricSpec": lambda stub, pool, extra: stub.GetMetricSpec(ref(pool, **extra), timeout=T),
    "GetMetrics": lambda stub, pool, extra: stub.GetMetrics(metrics_request(pool, "", **extra), timeout=T),
    "StreamIsActive": lambda stub, pool, extra: _first_stream_message(stub.StreamIsActive(ref(pool, **extra))),
}


async def _first_stream_message(call: grpc.aio.UnaryStreamCall) -> pb.IsActiveResponse:
    try:
        return await asyncio.wait_for(call.read(), T)
    finally:
        call.cancel()


@pytest.mark.parametrize("rpc", list(RPC_CALLS))
def test_unknown_metadata_keys_are_invalid_argument_and_named(rpc: str) -> None:
    async def scenario() -> None:
        async with scaler(store_with({"alpha": 2})) as s:
            call = RPC_CALLS[rpc](s.stub, "alpha", {"pools": "alpha", "metricName": "x"})
            details = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT)
            assert "'metricName'" in details and "'pools'" in details
            assert "scalerAddress" in details  # the message lists what is allowed
            assert sample(s.registry, m.REQUESTS_TOTAL, rpc=rpc, code="INVALID_ARGUMENT") == 1

    run(scenario())


def test_auth_params_in_metadata_point_to_a_trigger_authentication() -> None:
    async def scenario() -> None:
        async with scaler(store_with({"alpha": 2})) as s:
            details = await expect_error(
                s.stub.IsActive(ref("alpha", caCert="-----BEGIN CERTIFICATE-----"), timeout=T),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
            assert "'caCert'" in details and "TriggerAuthentication" in details
            assert "BEGIN CERTIFICATE" not in details  # values are never echoed

    run(scenario())


@pytest.mark.parametrize("rpc", list(RPC_CALLS))
@pytest.mark.parametrize("pool", [pytest.param(None, id="missing"), pytest.param("", id="empty")])
def test_pool_is_required(rpc: str, pool: str | None) -> None:
    async def scenario() -> None:
        async with scaler(store_with({"alpha": 2})) as s:
            details = await expect_error(RPC_CALLS[rpc](s.stub, pool, {}), grpc.StatusCode.INVALID_ARGUMENT)
            assert "'pool'" in details

    run(scenario())


@pytest.mark.parametrize("rpc", list(RPC_CALLS))
def test_unknown_pool_is_not_found_naming_the_known_pools(rpc: str) -> None:
    async def scenario() -> None:
        async with scaler(store_with({"alpha": 2, "beta": 1})) as s:
            details = await expect_error(RPC_CALLS[rpc](s.stub, "gamma", {}), grpc.StatusCode.NOT_FOUND)
            assert "'gamma'" in details and "alpha, beta" in details

    run(scenario())


def test_a_metric_name_of_another_pool_is_invalid_argument() -> None:
    async def scenario() -> None:
        async with scaler(store_with({"alpha": 2, "beta": 1})) as s:
            details = await expect_error(
                s.stub.GetMetrics(metrics_request("alpha", "tokenscaler-beta"), timeout=T),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
            assert "tokenscaler-alpha" in details
            # an empty metric name (some clients send none) is answered
            value = (await s.stub.GetMetrics(metrics_request("alpha", ""), timeout=T)).metricValues[0]
            assert value.metricName == "tokenscaler-alpha" and value.metricValue == 2

    run(scenario())


def test_before_the_first_plan_metrics_are_unavailable_but_the_spec_is_answered() -> None:
    async def scenario() -> None:
        async with scaler(PlanStore()) as s:
            details = await expect_error(
                s.stub.GetMetrics(metrics_request("alpha"), timeout=T), grpc.StatusCode.UNAVAILABLE
            )
            assert "no plan" in details
            await expect_error(s.stub.IsActive(ref("alpha"), timeout=T), grpc.StatusCode.UNAVAILABLE)
            spec = (await s.stub.GetMetricSpec(ref("alpha"), timeout=T)).metricSpecs[0]
            assert (spec.metricName, spec.targetSizeFloat) == ("tokenscaler-alpha", 1.0)
            assert sample(s.registry, m.REQUESTS_TOTAL, rpc="GetMetrics", code="UNAVAILABLE") == 1

    run(scenario())


# --------------------------------------------------------------------------- StreamIsActive


def test_stream_pushes_when_activity_flips_and_only_then() -> None:
    async def scenario() -> None:
        async with scaler(PlanStore()) as s:
            call = s.stub.StreamIsActive(ref("alpha"))
            await wait_for(lambda: sample(s.registry, m.STREAMS_OPEN) == 1, message="the stream to open")
            # the stream waits for the first plan, then sends the current value at once
            s.store.publish(make_plan({"alpha": 0, "beta": 3}), published_at=1.0)
            assert (await asyncio.wait_for(call.read(), T)).result is False
            # a new plan with the same activity for this pool sends nothing (the stream counts the
            # stale plan it looked at, which shows it has seen it) ...
            s.store.publish(make_plan({"alpha": 0, "beta": 5}), published_at=2.0, stale=True, stale_since=2.0)
            await wait_for(
                lambda: sample(s.registry, m.STALE_ANSWERS_TOTAL, rpc="StreamIsActive") == 1,
                message="the stream to look at the unchanged plan",
            )
            assert sample(s.registry, m.STREAM_MESSAGES_TOTAL) == 1
            # ... and the next message is the flip to active, then back
            s.store.publish(make_plan({"alpha": 4, "beta": 5}), published_at=3.0)
            assert (await asyncio.wait_for(call.read(), T)).result is True
            s.store.publish(make_plan({"alpha": 6, "beta": 5}), published_at=4.0)
            s.store.publish(make_plan({"alpha": 0, "beta": 5}), published_at=5.0)
            assert (await asyncio.wait_for(call.read(), T)).result is False
            assert sample(s.registry, m.STREAM_MESSAGES_TOTAL) == 3

            call.cancel()
            await wait_for(lambda: sample(s.registry, m.STREAMS_OPEN) == 0, message="the stream to close")
            assert sample(s.registry, m.REQUESTS_TOTAL, rpc="StreamIsActive", code="CANCELLED") == 1

    run(scenario())


def test_stream_sends_the_current_value_at_once_when_a_plan_exists() -> None:
    async def scenario() -> None:
        async with scaler(store_with({"alpha": 2})) as s:
            call = s.stub.StreamIsActive(ref("alpha"))
            assert (await asyncio.wait_for(call.read(), T)).result is True
            call.cancel()

    run(scenario())


def test_stream_ends_not_found_when_the_pool_leaves_the_plan() -> None:
    async def scenario() -> None:
        async with scaler(store_with({"alpha": 2, "beta": 1})) as s:
            call = s.stub.StreamIsActive(ref("beta"))
            assert (await asyncio.wait_for(call.read(), T)).result is True
            s.store.publish(make_plan({"alpha": 2}, make_config({"alpha": 40})), published_at=1010.0)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(call.read(), T)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert "'beta'" in (info.value.details() or "")

    run(scenario())


def test_serves_on_uvloop_like_the_controller() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with scaler(store_with({"alpha": 0})) as s:
            call = s.stub.StreamIsActive(ref("alpha"))
            assert (await asyncio.wait_for(call.read(), T)).result is False
            s.store.publish(make_plan({"alpha": 11}), published_at=1010.0)
            assert (await asyncio.wait_for(call.read(), T)).result is True
            assert (await s.stub.GetMetrics(metrics_request("alpha"), timeout=T)).metricValues[0].metricValue == 11
            call.cancel()

    run(scenario(), loop_factory=uvloop.new_event_loop)


# --------------------------------------------------------------------------- metrics and names


def test_request_metrics_count_every_rpc_by_code() -> None:
    async def scenario() -> None:
        async with scaler(store_with({"alpha": 2})) as s:
            for _ in range(3):
                await s.stub.GetMetrics(metrics_request("alpha"), timeout=T)
            await expect_error(s.stub.GetMetrics(metrics_request("nope"), timeout=T), grpc.StatusCode.NOT_FOUND)
            await s.stub.GetMetricSpec(ref("alpha"), timeout=T)
            assert sample(s.registry, m.REQUESTS_TOTAL, rpc="GetMetrics", code="OK") == 3
            assert sample(s.registry, m.REQUESTS_TOTAL, rpc="GetMetrics", code="NOT_FOUND") == 1
            assert sample(s.registry, m.REQUESTS_TOTAL, rpc="GetMetricSpec", code="OK") == 1
            assert sample(s.registry, m.REQUEST_DURATION_SECONDS + "_count", rpc="GetMetrics") == 4
            exported = {metric.name for metric in s.registry.collect()}
            exported |= {sample.name for metric in s.registry.collect() for sample in metric.samples}
            for name in m.METRIC_NAMES:
                assert name in exported, name
            assert all(n.startswith(m.PREFIX) for n in exported)

    run(scenario())


@pytest.mark.parametrize(
    ("pool", "want"),
    [
        pytest.param("llama-8b", "tokenscaler-llama-8b", id="dns-label-kept"),
        pytest.param("Llama.8B", "tokenscaler-llama-8b", id="uppercase-and-dot-sanitized"),
    ],
)
def test_metric_name(pool: str, want: str) -> None:
    assert metric_name(pool) == want


def test_trigger_metadata_parses_kedas_keys() -> None:
    meta = TriggerMetadata.parse({"pool": "alpha", "scalerAddress": "h:1", "enableTLS": "true"})
    assert (meta.pool, meta.scaler_address, meta.enable_tls, meta.unsafe_ssl) == ("alpha", "h:1", "true", None)


def test_a_busy_address_is_an_os_error() -> None:
    async def scenario() -> None:
        server, port = await start_scaler(PlanStore(), "127.0.0.1:0", None)
        try:
            with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
                await start_scaler(PlanStore(), f"127.0.0.1:{port}", None)
        finally:
            await server.stop(None)

    run(scenario())


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make throwaway certificates")
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(pki: Pki) -> None:
    tls = ScalerTLS(pki.server_cert, pki.server_key, client_ca_pem=pki.ca)
    with_cert = grpc.ssl_channel_credentials(pki.ca, pki.client_key, pki.client_cert)

    async def scenario() -> None:
        store = store_with({"alpha": 3})
        async with scaler(store, tls=tls, channel_credentials=with_cert) as s:
            value = (await s.stub.GetMetrics(metrics_request("alpha"), timeout=T)).metricValues[0]
            assert value.metricValue == 3

            refused = [
                grpc.ssl_channel_credentials(pki.ca),  # no client certificate
                grpc.ssl_channel_credentials(pki.ca, pki.stranger_key, pki.stranger_cert),  # untrusted one
            ]
            for creds in refused:
                async with grpc.aio.secure_channel(s.target, creds) as channel:
                    stub = type(s.stub)(channel)
                    await expect_error(
                        stub.GetMetrics(metrics_request("alpha"), timeout=T), grpc.StatusCode.UNAVAILABLE
                    )
            async with grpc.aio.insecure_channel(s.target) as channel:  # plaintext to a TLS port
                stub = type(s.stub)(channel)
                await expect_error(stub.IsActive(ref("alpha"), timeout=T), grpc.StatusCode.UNAVAILABLE)

    run(scenario())


def test_server_only_tls_with_kedas_ca_cert(pki: Pki, tmp_path: Path) -> None:
    for name, data in {"tls.crt": pki.server_cert, "tls.key": pki.server_key}.items():
        (tmp_path / name).write_bytes(data)
    tls = ScalerTLS.from_files(tmp_path / "tls.crt", tmp_path / "tls.key")
    assert not tls.mutual

    async def scenario() -> None:
        async with scaler(
            store_with({"alpha": 3}), tls=tls, channel_credentials=grpc.ssl_channel_credentials(pki.ca)
        ) as s:
            assert (await s.stub.IsActive(ref("alpha"), timeout=T)).result is True
            # a client that does not trust the server's CA is refused
            async with grpc.aio.secure_channel(s.target, grpc.ssl_channel_credentials(pki.other_ca)) as channel:
                stub = type(s.stub)(channel)
                await expect_error(stub.IsActive(ref("alpha"), timeout=T), grpc.StatusCode.UNAVAILABLE)

    run(scenario())


def test_unreadable_tls_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"TLS certificate .*missing\.crt"):
        ScalerTLS.from_files(tmp_path / "missing.crt", tmp_path / "missing.key")


def test_a_renewed_certificate_is_served_to_new_connections_without_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.security.pki import Ca

    first, second = Ca(tmp_path, "ca-1"), Ca(tmp_path, "ca-2")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"  # the mounted Secret's files
    first.issue("server-1", server=True).install(cert, key)
    tls = ScalerTLS.from_files(cert, key)

    async def answers(target: str, ca: Path) -> bool:
        """A new connection (its own subchannel) that trusts only ``ca`` gets an answer."""
        creds = grpc.ssl_channel_credentials(ca.read_bytes())
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.secure_channel(target, creds, options=options) as channel:
            stub = pb_grpc.ExternalScalerStub(channel)
            try:
                return (await stub.IsActive(ref("alpha"), timeout=T)).result is True
            except grpc.aio.AioRpcError:
                return False

    async def until(target: str, ca: Path, want: bool, message: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while await answers(target, ca) != want:
            assert loop.time() < deadline, message
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        async with scaler(store_with({"alpha": 3}), tls=tls, channel_credentials=grpc.ssl_channel_credentials(
                first.pem.read_bytes())) as s:  # fmt: skip
            assert await answers(s.target, first.pem) and not await answers(s.target, second.pem)
            # cert-manager renews the Secret, here from another CA so the two are told apart
            second.issue("server-2", server=True).install(cert, key)
            await until(s.target, second.pem, True, "the renewed certificate served")
            assert not await answers(s.target, first.pem)
            # a file that does not load keeps the current certificate, and says why
            key.write_text("not a key\n")
            assert await answers(s.target, second.pem)
            assert "do not load" in caplog.text and "previous certificate stays in use" in caplog.text
            assert "not a key" not in caplog.text

    with caplog.at_level("WARNING", logger="tokenscaler.serve.scaler"):
        run(scenario())
