"""The `tokenscaler` command: one entry point, a subcommand per role.

Each role lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this module only wires them together, importing a role's module
when the command line is parsed (heavy imports stay inside each role's ``run``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from tokenscaler import __version__

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("tokenscaler.commands.validate", "check a token-pools config file"),
    "plan": ("tokenscaler.commands.plan", "one allocation and plan from a config and a usage file"),
    "sim": ("tokenscaler.sim.cli", "run a vLLM-compatible engine simulator"),
    "sidecar": ("tokenscaler.sidecar.cli", "run the rate-limit sidecar in front of one vLLM replica"),
    "controller": ("tokenscaler.control.cli", "run the controller: metrics in, plan out (KEDA + sidecars)"),
    "webhook": ("tokenscaler.kube.webhook_cmd", "run the admission webhooks (validate CRs, inject sidecars)"),
    "convert": ("tokenscaler.kube.convert_cmd", "write a config as TokenPool/Entitlement CRs, or CRs as a config"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenscaler", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tokenscaler {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:  # a role not built into this checkout
            if e.name != module_name:
                raise
            continue
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
        return 130


if __name__ == "__main__":
    sys.exit(main())
