"""The rate-limit sidecar: a reverse proxy in front of one vLLM replica.

It identifies the entitlement of every request, admits or rejects it against that
entitlement's limits on this replica (:mod:`tokenscaler.core.limiter`), counts tokens as they
stream and exports per-entitlement demand and usage for the controller. Modules:
:mod:`~tokenscaler.sidecar.proxy` (the aiohttp app), :mod:`~tokenscaler.sidecar.gatekeeper`
(queueing and preemption around the pure limiter), :mod:`~tokenscaler.sidecar.estimates`
(request bodies to estimates), :mod:`~tokenscaler.sidecar.sse` (counting a stream),
:mod:`~tokenscaler.sidecar.errors` (OpenAI error bodies and rate-limit headers),
:mod:`~tokenscaler.sidecar.limits` (where limits come from) and :mod:`~tokenscaler.sidecar.metrics`.
The process is wired in :mod:`tokenscaler.cli.sidecar`.
"""
