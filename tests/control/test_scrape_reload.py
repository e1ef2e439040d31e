"""The embedded scraper re-reads its config file when it changes: replicas come and go
(the local demo's replica manager) without restarting the controller."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import yaml

from tokenscaler.config import load_model
from tokenscaler.sim.profile import load_profile
from tokenscaler.sim.server import SimServer
from tokenscaler.sources.scrape import ScrapeConfig, ScrapeSource


def write_atomically(path: Path, engines: list[str] | str) -> None:
    tmp = path.with_suffix(".tmp")
    doc = {"pools": {"p": {"engines": engines}}, "timeout_s": 1} if isinstance(engines, list) else engines
    tmp.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    os.replace(tmp, path)


async def start_sim() -> tuple[SimServer, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = SimServer(load_profile("demo"))
    port = await server.start_on(sock)
    return server, f"http://127.0.0.1:{port}/metrics"


def test_targets_follow_the_file_and_a_bad_file_keeps_the_last_good_ones(tmp_path: Path) -> None:
    async def scenario() -> None:
        a, url_a = await start_sim()
        b, url_b = await start_sim()
        path = tmp_path / "scrape.yaml"
        try:
            write_atomically(path, [url_a])
            source = ScrapeSource(load_model(ScrapeConfig, path, "'pools'"), path=path)
            assert (await source.read(1.0)).pools["p"].ready_replicas == 1

            write_atomically(path, [url_a, url_b])
            assert (await source.read(2.0)).pools["p"].ready_replicas == 2

            write_atomically(path, "pools: {p: {engines: [not a url]}}\n")
            obs = await source.read(3.0)  # logged, the two targets stay
            assert obs.pools["p"].ready_replicas == 2

            write_atomically(path, [url_b])
            obs = await source.read(4.0)
            assert obs.pools["p"].ready_replicas == 1
            assert [str(u) for u in source.config.pools["p"].engines] == [url_b]

            # unchanged file: no re-read, same targets
            assert source.reload() is False
            await source.close()
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_without_a_path_the_config_is_fixed(tmp_path: Path) -> None:
    source = ScrapeSource(ScrapeConfig(pools={}))
    assert source.reload() is False
