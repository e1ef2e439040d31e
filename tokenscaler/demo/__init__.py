"""``tokenscaler demo``: token pools working live on one machine, in real processes.

A driver like :mod:`tokenscaler.experiments` (whose scenario files, traffic and HPA arithmetic
it reuses): it starts the roles as subprocesses (``python -m tokenscaler sim|sidecar|controller``,
optionally Prometheus) on 127.0.0.1, plays KEDA and the HPA against the controller's gRPC scaler,
drives the scenario's traffic through the sidecars with the official ``openai`` client, shows it
live and writes a report. Modules: :mod:`~tokenscaler.demo.procs` (children, always ended),
:mod:`~tokenscaler.demo.fleet` (the processes and the replica manager),
:mod:`~tokenscaler.demo.load` (the load generator), :mod:`~tokenscaler.demo.measure`,
:mod:`~tokenscaler.demo.display`, :mod:`~tokenscaler.demo.report`,
:mod:`~tokenscaler.demo.compare` (live against virtual time), :mod:`~tokenscaler.demo.run`.
"""
