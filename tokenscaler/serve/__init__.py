"""The controller's servers: the KEDA external scaler (gRPC) and the HTTP API (the limits API, the plan).

The HTTP API (:mod:`tokenscaler.serve.api`) serves plain HTTP by default; with a certificate
it serves HTTPS only, optionally with mutual TLS, and bearer tokens can be required
(:mod:`tokenscaler.serve.http_security`, :mod:`tokenscaler.serve.auth`). The two servers do not import each other:
:mod:`tokenscaler.serve.scaler` (with its metric names in :mod:`tokenscaler.serve.scaler_metrics`
and its generated stubs in ``tokenscaler.serve._proto``) and :mod:`tokenscaler.serve.api`
answer from :class:`tokenscaler.control.store.PlanStore` alone (nothing is solved on a request).
Importing this package imports neither server.
"""
