"""The demo's parts that need no fleet: prompts of exact token counts, the compressed scenario,
the phases, and children that always end."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import pytest

from tokenscaler.core.tokens import chat_prompt_tokens
from tokenscaler.demo.load import api_key, prompt_messages
from tokenscaler.demo.measure import phases_of
from tokenscaler.demo.procs import ChildFailed, Supervisor
from tokenscaler.demo.run import compress
from tokenscaler.experiments.scenario import load_scenario
from tokenscaler.experiments.traffic import build_traffic


@pytest.mark.parametrize("tokens", [8, 9, 57, 200, 301, 1999])
def test_prompts_count_exactly_and_differ(tokens: int) -> None:
    a, b = prompt_messages(1, tokens), prompt_messages(2, tokens)
    assert chat_prompt_tokens(a) == chat_prompt_tokens(b) == tokens
    assert a != b


def test_the_demo_keys_match_the_config() -> None:
    loaded = load_scenario("demo")
    for name in loaded.scenario.traffic:
        assert api_key(loaded.config, name) == f"sk-{name}-demo"


def test_compressing_keeps_the_phases_and_the_traffic_shape(tmp_path: Path) -> None:
    full = load_scenario("demo")
    short = compress(full, 30, tmp_path)
    assert short.scenario.duration_s == 30
    assert (tmp_path / "scenario.yaml").is_file()
    pf, ps = phases_of(full, 180), phases_of(short, 30)
    assert (pf.peak_start, pf.peak_end) == (45, 125)
    assert ps.peak_start == pytest.approx(7.5) and ps.peak_end == pytest.approx(125 / 6)
    # the same rates in a sixth of the time: about a sixth of the requests, same seed same arrivals
    n_full = sum(a.times.size for a in build_traffic(full, 0, 180)[0])
    n_short = sum(a.times.size for a in build_traffic(short, 0, 30)[0])
    assert n_short == pytest.approx(n_full / 6, rel=0.2)
    again = sum(a.times.size for a in build_traffic(load_scenario(str(tmp_path / "scenario.yaml")), 0, 30)[0])
    assert again == n_short


def test_children_end_even_when_they_ignore_sigterm(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, grace_s=1.0)
    ignore = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
    ignore += "time.sleep(60)"
    stubborn = sup.start("stubborn", [sys.executable, "-c", ignore])
    polite = sup.start("polite", [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"])
    asyncio.run(stubborn.wait_for("up", 10))
    asyncio.run(polite.wait_for("up", 10))
    t = time.monotonic()
    sup.stop_all()
    assert time.monotonic() - t < 5
    assert not stubborn.alive and not polite.alive
    assert stubborn.popen.returncode == -signal.SIGKILL
    assert polite.popen.returncode == -signal.SIGTERM
    assert sup.children == []


def test_a_child_that_exits_early_is_reported_with_its_log(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path)
    child = sup.start("broken", [sys.executable, "-c", "import sys; print('bad flag'); sys.exit(2)"])
    with pytest.raises(ChildFailed, match=r"broken exited with 2 .*broken\.log.*bad flag"):
        asyncio.run(child.wait_for("listening on", 10))
    sup.stop_all()
