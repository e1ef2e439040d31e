"""tokenscaler: token pools for multi-tenant LLM inference.

Capacity is sold as entitlements in inference-native units (token throughput, KV-cache
tokens, concurrency). One controller turns metrics into an allocation and emits, from the
same numbers, replica targets for KEDA and per-entitlement limits for rate-limit sidecars.
"""

__version__ = "0.1.0"
