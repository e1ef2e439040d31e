"""Kubernetes: CRDs generated from the config models, translations, the operator's client
layer (list+watch, status patches, Lease leader election, the state ConfigMap) and the
admission webhooks.

Group ``tokenpools.io``, version ``v1alpha1``, kinds ``TokenPool`` and ``Entitlement``. The
spec of each is the config file's model verbatim (same snake_case field names, minus
``name``, which is ``metadata.name``), so a config moves to a cluster without retyping
(``tokenscaler convert``).
"""

GROUP = "tokenpools.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
POOL_KIND, POOL_PLURAL = "TokenPool", "tokenpools"
ENTITLEMENT_KIND, ENTITLEMENT_PLURAL = "Entitlement", "entitlements"
POOL_LABEL = "tokenpools.io/pool"
"""Pods carrying this label get the sidecar injected; its value names the pool."""
