"""Virtual-time experiments: scenarios, baselines, the runner that drives the real code, reports.

A scenario (:mod:`~tokenscaler.experiments.scenario`) is replayed (:mod:`~.runner`) with the
simulator's engine per replica, the sidecar's limiter per replica, the controller's control
step (:func:`tokenscaler.core.step.control_step`) fed by the embedded scraper's parser, and
KEDA + HPA arithmetic (:mod:`~.replicas`); :mod:`~.policies` are the alternatives compared,
:mod:`~.measure` and :mod:`~.report` what is written. Wired by ``tokenscaler experiment``
(:mod:`tokenscaler.cli.experiment`).
"""
