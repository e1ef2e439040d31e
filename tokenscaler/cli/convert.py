"""``tokenscaler convert``: a config file as TokenPool and Entitlement objects, and back.

    tokenscaler convert --config FILE [--namespace NS] [--out FILE]     # config -> CRs (YAML stream)
    tokenscaler convert --from-crs FILE [--out FILE]                    # CRs -> config (YAML)

Both directions go through the config models, so what comes out is validated; a CR file may
hold other kinds too (only TokenPools and Entitlements are read).
"""

from __future__ import annotations

import argparse
import sys

from tokenscaler.cli.common import EXIT_BAD_INPUT, EXIT_OK, config_error


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", metavar="FILE", help="token-pools config (YAML or JSON) to write as CRs")
    src.add_argument("--from-crs", metavar="FILE", help="YAML stream of TokenPool and Entitlement objects")
    p.add_argument("--namespace", default="tokenscaler", help="namespace of the CRs written (default %(default)s)")
    p.add_argument("--out", metavar="FILE", help="write here instead of stdout")


def run(args: argparse.Namespace) -> int:
    import yaml

    from tokenscaler.config import load_config
    from tokenscaler.core.validation import ConfigError
    from tokenscaler.kube import API_VERSION, ENTITLEMENT_KIND, POOL_KIND
    from tokenscaler.kube.translate import config_from_crs, crs_yaml

    if args.config:
        try:
            config = load_config(args.config)
        except ConfigError as e:
            return config_error(e)
        text = crs_yaml(config, args.namespace, args.config)
    else:
        try:
            with open(args.from_crs, encoding="utf-8") as f:
                docs = [d for d in yaml.safe_load_all(f) if isinstance(d, dict)]
        except (OSError, yaml.YAMLError) as e:
            print(f"{args.from_crs}: cannot read: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        ours = [d for d in docs if d.get("apiVersion") == API_VERSION]
        t = config_from_crs(
            [d for d in ours if d.get("kind") == POOL_KIND], [d for d in ours if d.get("kind") == ENTITLEMENT_KIND]
        )
        errors = [f"{kind} {name}: {why}" for (kind, name), why in t.problems.items()] + t.errors
        if errors or t.config is None:
            for line in errors:
                print(f"{args.from_crs}: {line}", file=sys.stderr)
            return EXIT_BAD_INPUT
        text = yaml.safe_dump(
            t.config.model_dump(mode="json", exclude_defaults=True, exclude_none=True), sort_keys=False, width=120
        )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK
