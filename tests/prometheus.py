"""A real Prometheus (Debian's package) on loopback, for end-to-end tests and benchmarks."""

from __future__ import annotations

import json
import re
import shutil
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.support import Proc, wait_until

# Prometheus 2.x logs (at info) the address it bound: with port 0, the port the kernel picked.
LISTENING_RE = re.compile(r'msg="Listening on" address=127\.0\.0\.1:(?P<port>\d+)')


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


class PrometheusServer:
    """Starts ``prometheus`` on 127.0.0.1, port 0, scraping the given jobs every
    ``scrape_interval``; ``port`` and ``url`` are what it bound (read from its log)."""

    def __init__(
        self,
        workdir: Path,
        jobs: list[dict[str, Any]],
        scrape_interval: str = "1s",
        rule_files: list[Path] | None = None,
    ) -> None:
        binary = prometheus_binary()
        if binary is None:
            raise RuntimeError("the prometheus binary is missing: `make test` installs Debian's prometheus package")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
                    "rule_files": [str(p) for p in rule_files or []],
                    "scrape_configs": jobs,
                }
            )
        )
        self.proc = Proc(
            [
                binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                "--web.listen-address=127.0.0.1:0",
                "--storage.tsdb.retention.time=1h",
                "--log.level=info",  # the "Listening on" line is at info
            ]
        )
        try:
            self.port = int(self.proc.wait_for_line(LISTENING_RE, timeout=30)["port"])
            self.url = f"http://127.0.0.1:{self.port}"
            wait_until(self._ready, timeout=30, message=f"prometheus ready on {self.url}")
        except BaseException:
            self.proc.stop()
            raise

    def _ready(self) -> bool:
        if self.proc.popen.poll() is not None:
            raise AssertionError(f"prometheus exited: {self.proc.output[-2000:]}")
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
            return r.status == 200

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, promql: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until ``promql`` returns at least one series."""
        return wait_until(lambda: self.query(promql), timeout=timeout, interval=0.25, message=f"series for {promql}")

    def stop(self) -> None:
        self.proc.stop()


def static_job(name: str, targets: list[str], labels: dict[str, str] | None = None, honor_labels: bool = False):
    job: dict[str, Any] = {"job_name": name, "static_configs": [{"targets": targets, "labels": labels or {}}]}
    if honor_labels:
        job["honor_labels"] = True
    return job
