"""``tokenscaler sim``: run one vLLM-compatible engine simulator on a host and port.

Wires :class:`tokenscaler.sim.server.SimServer` into a process.

Prints ``tokenscaler sim listening on http://HOST:PORT`` (flushed) once it accepts
connections (``--port 0`` picks a free port), and stops cleanly on SIGTERM or SIGINT.
Scheduler and cache flags carry vLLM's names and override the profile's values.
"""

from __future__ import annotations

import argparse

from tokenscaler.cli.common import EXIT_OK, bind, fail
from tokenscaler.sim.profile import DEFAULT_PROFILE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port, 0 for any free port (default: %(default)s)")
    parser.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        help="built-in profile (llama-3.1-8b-h100, llama-3.1-70b-h100-tp4, demo) or a YAML file (default: %(default)s)",
    )
    parser.add_argument(
        "--model-name", "--served-model-name", dest="model_name", default=None,
        help="model name to serve and label metrics with (default: the profile's served_model_name)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the output-length draws (default: 0)")
    parser.add_argument(
        "--startup-s", type=float, default=0.0,
        help="seconds during which /health and completions answer 503, as while a model loads",
    )  # fmt: skip
    parser.add_argument(
        "--max-num-queued-reqs", type=int, default=None,
        help="waiting requests beyond which new ones get 503 (default: unlimited, as vLLM)",
    )  # fmt: skip
    group = parser.add_argument_group("profile overrides (vLLM flag names)")
    group.add_argument("--max-num-seqs", type=int, default=None)
    group.add_argument("--max-num-batched-tokens", type=int, default=None)
    group.add_argument("--max-model-len", type=int, default=None)
    group.add_argument("--num-gpu-blocks", "--num-gpu-blocks-override", dest="num_gpu_blocks", type=int, default=None)
    group.add_argument("--block-size", type=int, default=None)
    group.add_argument("--long-prefill-token-threshold", type=int, default=None)
    group.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default=None)
    group.add_argument("--stream-interval", type=int, default=None)
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--list-profiles", action="store_true", help="print the built-in profiles and exit")


_OVERRIDES = (
    "max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_gpu_blocks", "block_size",
    "long_prefill_token_threshold", "scheduling_policy", "stream_interval", "enable_prefix_caching",
)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from tokenscaler.cli import runtime
    from tokenscaler.sim.profile import ProfileError, builtin_profile_names, load_profile
    from tokenscaler.sim.server import SimServer

    if args.list_profiles:
        for name in builtin_profile_names():
            p = load_profile(name)
            print(f"{name}: {p.description} (kv {p.kv_capacity_tokens} tokens, max_num_seqs {p.max_num_seqs})")
        return EXIT_OK
    try:
        profile = load_profile(args.profile).with_overrides(**{k: getattr(args, k) for k in _OVERRIDES})
    except ProfileError as e:
        return fail("sim", str(e))

    async def serve() -> int:
        server = SimServer(
            profile,
            model_name=args.model_name,
            seed=args.seed,
            startup_s=args.startup_s,
            max_num_queued_reqs=args.max_num_queued_reqs,
        )
        try:
            sock = bind("--host/--port", args.host, args.port)
        except OSError as e:
            return fail("sim", str(e))
        port = await server.start_on(sock)
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"tokenscaler sim: profile {profile.name}, model {server.model_name}", flush=True)
        print(f"tokenscaler sim listening on http://{host}:{port}", flush=True)
        await runtime.until_signal()
        await server.close()
        return EXIT_OK

    return runtime.run(serve)
