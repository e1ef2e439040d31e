"""``tokenscaler probe``: measure one engine (vLLM or the simulator) and print its ``replica:`` block.

    tokenscaler probe --url URL [--out FILE] [--prompt-tokens N --output-tokens N | --trace CSV]
        [--tpot-p99-ms X] [--max-seconds S] [--png FILE]

See :mod:`tokenscaler.probe`. Prints the measured curve as a table and the ``replica:``
block; ``--out`` also writes the block to a file, ``--png`` the curve as a picture.
Exit 1 when the engine cannot be read.
"""

from __future__ import annotations

import argparse
import csv
import statistics

from tokenscaler.cli import extras
from tokenscaler.cli.common import EXIT_BAD_INPUT, EXIT_OK, fail, usage_errors
from tokenscaler.core.model import TokenWeights


def add_arguments(p: argparse.ArgumentParser) -> None:
    defaults = TokenWeights()
    p.add_argument("--url", required=True, help="the engine's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--out", metavar="FILE", help="write the replica block (YAML) here too")
    p.add_argument(
        "--png", metavar="FILE",
        help="write the measured curve as a PNG (needs tokenscaler[plots]; default: beside --out when installed)",
    )  # fmt: skip
    p.add_argument("--prompt-tokens", type=int, default=1024, help="prompt of each request (default: %(default)s)")
    p.add_argument("--output-tokens", type=int, default=256, help="tokens generated per request (default: %(default)s)")
    p.add_argument(
        "--trace", metavar="CSV",
        help="take the request shape from a trace (columns prompt_tokens,output_tokens: their medians)",
    )  # fmt: skip
    p.add_argument(
        "--tpot-p99-ms", type=float, default=25.0,
        help="the latency target the knee must hold: p99 time per output token (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--max-seconds", type=float, default=110.0, help="bound on the whole run (default: %(default)s)")
    p.add_argument("--level-s", type=float, default=4.0, help="shortest time at each concurrency (default: 4)")
    p.add_argument("--max-concurrency", type=int, default=None, help="highest concurrency (default: what KV holds)")
    p.add_argument("--weight-prompt", type=float, default=defaults.prompt, help="token_weights.prompt (default: 1.0)")
    p.add_argument(
        "--weight-generation", type=float, default=defaults.generation, help="token_weights.generation (default: 1.0)"
    )


def _trace_shape(path: str) -> tuple[int, int]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    prompts = [int(float(r["prompt_tokens"])) for r in rows]
    outputs = [int(float(r["output_tokens"])) for r in rows]
    if not prompts:
        raise ValueError(f"{path}: no rows")
    return int(statistics.median(prompts)), int(statistics.median(outputs))


def run(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    import aiohttp

    from tokenscaler.probe import Shape, curve_table, knee, replica_block, run_probe, write_png

    errors = []
    for flag in ("prompt_tokens", "output_tokens"):
        if getattr(args, flag) < 1:
            errors.append(f"--{flag.replace('_', '-')} ({getattr(args, flag)}) must be >= 1")
    for flag in ("tpot_p99_ms", "max_seconds", "level_s"):
        if getattr(args, flag) <= 0:
            errors.append(f"--{flag.replace('_', '-')} ({getattr(args, flag):g}) must be > 0")
    code = usage_errors("probe", errors) or (extras.require("probe --png", "plots") if args.png else 0)
    if code:
        return code
    prompt, output = args.prompt_tokens, args.output_tokens
    if args.trace:
        try:
            prompt, output = _trace_shape(args.trace)
        except (OSError, KeyError, ValueError) as e:
            return fail("probe", f"--trace {args.trace}: {e}")
    shape = Shape(prompt, output, args.weight_prompt, args.weight_generation)
    print(
        f"tokenscaler probe: {args.url}, prompt {prompt} / output {output} tokens, target p99 TPOT "
        f"{args.tpot_p99_ms:g} ms, at most {args.max_seconds:g}s",
        flush=True,
    )
    try:
        info, levels = asyncio.run(
            run_probe(
                args.url, shape, args.tpot_p99_ms, max_seconds=args.max_seconds, level_s=args.level_s,
                max_concurrency=args.max_concurrency, log=lambda line: print(line, flush=True),
            )
        )  # fmt: skip
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        return fail("probe", f"cannot read the engine at {args.url}: {e}", EXIT_BAD_INPUT)
    best = knee(levels, args.tpot_p99_ms)
    print(f"\nengine: model {info.model}, kv_tokens {info.kv_tokens}, max_model_len {info.max_model_len}\n")
    print(curve_table(levels, shape, args.tpot_p99_ms))
    block = replica_block(info, best, shape, args.tpot_p99_ms)
    print(block, end="")
    if best is None:
        print("# no level held the target: the concurrency and throughput above are 0")
    if args.out:
        Path(args.out).write_text(block, encoding="utf-8")
    png = args.png or (str(Path(args.out).with_suffix(".png")) if args.out else None)
    if png and not args.png and extras.missing(extras.EXTRAS["plots"]):
        print(f"# curve: no PNG without matplotlib ({extras.install_hint('plots')})")
    elif png:
        write_png(Path(png), levels, shape, args.tpot_p99_ms, best)
        print(f"# curve: {png}")
    return EXIT_OK
