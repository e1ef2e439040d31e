"""The composition layer: the one ``tokenscaler`` command, a subcommand per role.

Every process is wired here and only here: each role's module (``tokenscaler.cli.ROLE``)
exposes ``add_arguments(parser)`` and ``run(args) -> int`` and is the only code that
parses argv for it, builds its servers and starts its event loop
(:mod:`tokenscaler.cli.runtime`). Address parsing, error reporting and exit codes are in
:mod:`tokenscaler.cli.common` (0 ok, 1 bad input, 2 usage). The packages below it
(``core``, ``sources``, ``control``, ``serve``, ``sidecar``, ``sim``) never read argv.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from tokenscaler import __version__
from tokenscaler.cli.common import EXIT_INTERRUPTED

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("tokenscaler.cli.validate", "check a token-pools config file"),
    "plan": ("tokenscaler.cli.plan", "one allocation and plan from a config and a usage file"),
    "sim": ("tokenscaler.cli.sim", "run a vLLM-compatible engine simulator"),
    "sidecar": ("tokenscaler.cli.sidecar", "run the rate-limit sidecar in front of one vLLM replica"),
    "controller": ("tokenscaler.cli.controller", "run the controller: metrics in, plan out (KEDA + sidecars)"),
    "experiment": ("tokenscaler.cli.experiment", "virtual-time experiments: policies on a scenario"),
    "demo": ("tokenscaler.cli.demo", "token pools live on this machine: a fleet, a scenario's traffic, a report"),
    "webhook": ("tokenscaler.cli.webhook", "run the admission webhooks (validate CRs, inject sidecars)"),
    "convert": ("tokenscaler.cli.convert", "write a config as TokenPool/Entitlement CRs, or CRs as a config"),
    "showback": ("tokenscaler.cli.showback", "what each entitlement cost over a time range, from Prometheus"),
    "render-dashboards": ("tokenscaler.cli.render_dashboards", "draw the dashboards' panels from Prometheus into PNGs"),
    "probe": ("tokenscaler.cli.probe", "measure one engine and print the replica block for its pool"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenscaler",
        description="Token pools for multi-tenant LLM inference: one capacity model for admission and autoscaling.",
    )
    parser.add_argument("--version", action="version", version=f"tokenscaler {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
