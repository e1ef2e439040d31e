"""The rate-limit sidecar: a reverse proxy in front of one vLLM replica.

It identifies the entitlement of every request, admits or rejects it against that
entitlement's limits on this replica (:mod:`tokenscaler.core.limiter`), counts tokens as they
stream and exports per-entitlement demand and usage for the controller. Modules:

* :mod:`~tokenscaler.sidecar.proxy`: the aiohttp app (identify, admit, forward, count, settle);
* :mod:`~tokenscaler.sidecar.apis`: the per-API shapes of the metered routes (parse, estimate,
  count, read usage, shape errors);
* :mod:`~tokenscaler.sidecar.gatekeeper`: queueing and preemption around the pure limiter;
* :mod:`~tokenscaler.sidecar.flight`: one admitted request, from admission to its settlement;
* :mod:`~tokenscaler.sidecar.estimates`: request bodies to estimates;
* :mod:`~tokenscaler.sidecar.sse`: counting a response as it passes (SSE streams, JSON bodies);
* :mod:`~tokenscaler.sidecar.errors`: OpenAI error bodies and rate-limit headers;
* :mod:`~tokenscaler.sidecar.budget`: spent budgets, and the 429 that says so;
* :mod:`~tokenscaler.sidecar.engine_limits`: what this replica's engine says it holds;
* :mod:`~tokenscaler.sidecar.limits`: where limits come from (static, or the controller's limits API);
* :mod:`~tokenscaler.sidecar.pool_source`: the limits API v1beta1's client (watch, deltas, the config);
* :mod:`~tokenscaler.sidecar.pool_view`: what a v1beta1 document changes (pure);
* :mod:`~tokenscaler.sidecar.limits_auth`: the sidecar's credentials as a client of that API;
* :mod:`~tokenscaler.sidecar.metrics`: every metric it exports.

The process is wired in :mod:`tokenscaler.cli.sidecar`.
"""
