"""The controller's servers: the KEDA external scaler (gRPC) and the limits API (HTTPS).

Submodules do not import each other: :mod:`tokenscaler.serve.scaler` (with its metric names in
:mod:`tokenscaler.serve.scaler_metrics` and its generated stubs in ``tokenscaler.serve._proto``)
reads only from :class:`tokenscaler.control.store.PlanStore`. Importing this package imports
neither server.
"""
