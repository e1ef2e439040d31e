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
KEYS_SECRET_TYPE = "tokenpools.io/api-key-digests"
"""The ``type`` of a Secret an Entitlement's ``spec.api_key_secret_ref`` may name: each data
value holds sha256 hex digests of API keys, one per line. The operator lists and watches only
Secrets of this type (a field selector), so it never reads the namespace's other Secrets."""
KEYS_SECRET_REF = "api_key_secret_ref"
"""The Entitlement spec field naming that Secret (``{name: ...}``, the Entitlement's namespace)."""
