"""`tokenscaler validate --config FILE`: exit 0 with a summary, or 1 with one line per error."""

from __future__ import annotations

import argparse

from tokenscaler.cli.common import EXIT_OK, config_error
from tokenscaler.config import load_config
from tokenscaler.core.model import Tier
from tokenscaler.core.validation import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE", help="token-pools config (YAML or JSON)")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as e:
        return config_error(e)
    tiers = {t: sum(1 for e in config.entitlements if e.tier is t) for t in Tier}
    print(
        f"{args.config}: ok: {len(config.pools)} pool(s), {len(config.entitlements)} entitlement(s) "
        f"({', '.join(f'{n} {t.value}' for t, n in tiers.items())})"
    )
    return EXIT_OK
