"""``tokenscaler demo --duration-s 30`` end to end: real processes, a report whose numbers add up,
nothing left behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

pytestmark = pytest.mark.e2e


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ours(marker: str) -> list[str]:
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmd and _alive(int(d)):
                found.append(f"{d} {cmd[:120]}")
    return found


@pytest.mark.timeout(150)
def test_a_30s_demo_writes_a_consistent_report_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    proc = subprocess.run(
        [sys.executable, "-m", "tokenscaler", "demo", "--duration-s", "30", "--out", str(out), "--prometheus", "off"],
        cwd=REPO, capture_output=True, text=True, timeout=140, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "report:" in proc.stdout and "logs:" in proc.stdout
    # stdout is not a terminal: one plain line per interval, no terminal control codes
    assert "\x1b[" not in proc.stdout
    assert sum(1 for line in proc.stdout.splitlines() if line.startswith("t=")) >= 5

    doc = json.loads((out / "demo.json").read_text())
    raw = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert len(raw) > 200
    for tier, t in doc["tiers"].items():
        assert t["sent"] == t["answered"] + t["rejected"] + t["preempted"] + t["failed"], tier
        assert t["sent"] == sum(1 for r in raw if r["tier"] == tier and r["status"] != "unrouted"), tier
        assert t["rejected"] == sum(t["rejected_by_dimension"].values()), tier
        assert t["failed"] == 0, [r["detail"] for r in raw if r["tier"] == tier and r["status"] == "failed"][:3]
        assert t["unrouted"] == 0
    for name, e in doc["entitlements"].items():
        assert e["sent"] == e["answered"] + e["rejected"] + e["preempted"] + e["failed"], name
    g = doc["tiers"]["guaranteed"]
    # guaranteed requests are never rejected or cut for spot's sake
    assert g["rejected_not_own"] == 0 and g["preempted"] == 0
    assert all(r["own_limit"] for r in raw if r["tier"] == "guaranteed" and r["status"] == "rejected")
    # the overload throttles spot, and only within its window does spot lose much
    spot = doc["tiers"]["spot"]["phases"]
    assert spot["peak"]["throttled_fraction"] > 0.3
    assert spot["peak"]["throttled_fraction"] > spot["unloaded"]["throttled_fraction"]
    assert doc["verdict"]["guaranteed_ttft_p99_peak_s"] is not None

    report = (out / "report.md").read_text()
    assert "guaranteed" in report and "spot" in report and "p99" in report
    # the showback: the controller's counters split all of its ready replica time; spot pays backfill only
    sb = doc["showback"]
    assert "## Showback" in report
    assert sum(sum(p.values()) for p in sb["entitlements"].values()) == pytest.approx(sb["replica_seconds"], rel=1e-6)
    for name, parts in sb["entitlements"].items():
        if doc["entitlements"].get(name, {}).get("tier") == "spot":
            assert parts["reserved"] == parts["allocated"] == parts["idle"] == 0, name
    pngs = sorted(p.name for p in out.glob("*.png") if p.stat().st_size > 5000)
    assert pngs == ["admitted_vs_offered.png", "replicas.png", "throttling.png", "ttft_p99.png"]

    run = doc["run"]
    assert len(run["pids"]) >= 5  # controller + 2 x (simulator + sidecar)
    assert [p for p in run["pids"] if _alive(p)] == []
    assert run["ports"] and [p for p in run["ports"] if _listening(p)] == []
    assert _ours(str(tmp_path)) == []
