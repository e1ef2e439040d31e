"""The config file watcher (``control/reload.py``) and ``Controller.set_config`` in process: what
counts as a new generation, what a refused file does to the metrics and the status, and that
a file is re-read once per change (a refused one is not counted again until it changes)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from tests.core.builders import make_config, make_entitlement, make_pool
from tests.support import wait_until_async
from tokenscaler.config import load_config
from tokenscaler.control.loop import Controller
from tokenscaler.control.metrics import ControllerMetrics
from tokenscaler.control.reload import ConfigReloader
from tokenscaler.control.store import PlanStore
from tokenscaler.sources.scrape import ScrapeConfig, ScrapeSource


def write(path: Path, doc: dict | str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    os.replace(tmp, path)


def value(registry: CollectorRegistry, name: str) -> float | None:
    return registry.get_sample_value(name)


def test_reloads_count_generations_and_refusals(tmp_path: Path) -> None:
    async def scenario() -> None:
        path = tmp_path / "pools.yaml"
        first = make_config([make_pool("p")], [make_entitlement("a")])
        write(path, first)
        registry = CollectorRegistry()
        controller = Controller(
            load_config(path), ScrapeSource(ScrapeConfig(pools={})), PlanStore(), ControllerMetrics(registry)
        )
        reloader = ConfigReloader(path, controller)
        assert controller.generation == 1 and value(registry, "tokenscaler_config_generation") == 1.0
        assert await reloader.check() is False  # nothing changed on disk: not even read

        # same content, new file: read, no new generation
        write(path, yaml.safe_dump(first, sort_keys=False))
        assert await reloader.check() is False
        assert controller.generation == 1

        write(path, make_config([make_pool("p")], [make_entitlement("a", priority=3), make_entitlement("b")]))
        assert await reloader.check() is True
        assert controller.generation == 2 and value(registry, "tokenscaler_config_generation") == 2.0
        assert [e.name for e in controller.config.entitlements] == ["a", "b"]
        assert set(controller.rows["p"].names) == {"a", "b"}

        write(path, "pools: []\n")
        assert await reloader.check() is False
        assert await reloader.check() is False  # the same refused file: counted once
        assert value(registry, "tokenscaler_config_reload_failures_total") == 1.0
        assert value(registry, "tokenscaler_config_last_reload_success") == 0.0
        status = reloader.status()
        assert status["generation"] == 2 and status["source"] == "file"
        assert status["last_reload_error"].startswith(f"{path}: pools")
        assert [e.name for e in controller.config.entitlements] == ["a", "b"]  # the last good one
        # forced (SIGHUP): read again, refused again
        assert await reloader.check(force=True) is False
        assert value(registry, "tokenscaler_config_reload_failures_total") == 2.0

        write(path, first)  # valid again: back to the first config, one more generation
        assert await reloader.check() is True
        assert controller.generation == 3 and reloader.status()["last_reload_error"] is None
        assert value(registry, "tokenscaler_config_last_reload_success") == 1.0

    asyncio.run(scenario())


def test_the_watch_runs_until_stopped_and_a_request_reads_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        path = tmp_path / "pools.yaml"
        write(path, make_config([make_pool("p")], [make_entitlement("a")]))
        controller = Controller(
            load_config(path), ScrapeSource(ScrapeConfig(pools={})), PlanStore(), ControllerMetrics(CollectorRegistry())
        )
        reloader = ConfigReloader(path, controller, poll_s=3600.0)  # only a request wakes it
        task = asyncio.create_task(reloader.run())
        write(path, make_config([make_pool("p")], [make_entitlement("a"), make_entitlement("b")]))
        reloader.request()
        await wait_until_async(lambda: controller.generation == 2, timeout=5, message="the requested re-read")
        reloader.stop()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
