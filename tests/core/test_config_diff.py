"""What changed between two configs (``core/config_diff.py``): one change per field, by its
dotted path, in a fixed order; API keys only as counts; the entitlements that start clean."""

from __future__ import annotations

import json

from tests.core.builders import config, make_entitlement, make_pool, vec
from tokenscaler.core.config_diff import ConfigChange, config_changes, fresh_starts
from tokenscaler.core.model import hash_api_key

DIGESTS = [hash_api_key(f"sk-test-{i}") for i in range(4)]


def base(**gold: object) -> list[dict]:
    """Two entitlements; ``gold`` overrides fields of the first."""
    return [
        make_entitlement("gold", "guaranteed", **{"priority": 10, "api_keys": DIGESTS[:2], **gold}),
        make_entitlement("silver", "elastic", weight=2.0, api_keys=[DIGESTS[2]]),
    ]


def test_equal_configs_have_no_change() -> None:
    a = config([make_pool("p")], base())
    b = config([make_pool("p")], base())
    assert config_changes(a, b) == []
    # the order of an entitlement's keys is no change: they are a set
    c = config([make_pool("p")], base(api_keys=[DIGESTS[1], DIGESTS[0]]))
    assert config_changes(a, c) == []


def test_each_changed_field_is_one_change_by_its_dotted_path() -> None:
    old = config([make_pool("p")], base())
    new = config(
        [make_pool("p", replica={"throughput_tokens_per_s": 1000.0, "kv_tokens": 50000.0, "concurrency": 100.0})],
        base(guaranteed=vec(200.0, 10000.0, 10.0), priority=20),
    )
    changes = config_changes(old, new)
    assert changes == [
        ConfigChange("changed", "pool", "p", "p", "replica.kv_tokens", 100000.0, 50000.0),
        ConfigChange("changed", "entitlement", "p", "gold", "priority", 10, 20),
        ConfigChange("changed", "entitlement", "p", "gold", "guaranteed.throughput_tokens_per_s", 100.0, 200.0),
    ]
    assert [str(c) for c in changes] == [
        "pool p replica.kv_tokens 100000 -> 50000",
        "entitlement gold (pool p) priority 10 -> 20",
        "entitlement gold (pool p) guaranteed.throughput_tokens_per_s 100 -> 200",
    ]


def test_added_and_removed_objects_come_after_the_changes_of_their_kind() -> None:
    old = config([make_pool("p"), make_pool("old")], [*base(), make_entitlement("retired", "spot")])
    new = config(
        [make_pool("p"), make_pool("q")],
        [make_entitlement("new", "elastic", api_keys=[DIGESTS[3]]), *base(priority=11)],
    )
    changes = config_changes(old, new)
    assert [(c.kind, c.object, c.name, c.field) for c in changes] == [
        ("added", "pool", "q", None),
        ("removed", "pool", "old", None),
        ("added", "entitlement", "new", None),
        ("changed", "entitlement", "gold", "priority"),
        ("removed", "entitlement", "retired", None),
    ]
    assert str(changes[2]) == "entitlement new (pool p) added (tier elastic, priority 0, 1 key)"
    assert str(changes[4]) == "entitlement retired (pool p) removed (tier spot, priority 0, 0 keys)"
    # deterministic: the same inputs give the same list
    assert config_changes(old, new) == changes


def test_a_sub_object_that_appears_is_one_change_at_its_path() -> None:
    old = config([make_pool("p")], [])
    new = config([make_pool("p", pricing={"per_replica_hour": 2.5})], [])
    (change,) = config_changes(old, new)
    assert (change.field, change.old, change.new) == ("pricing", None, {"per_replica_hour": 2.5, "currency": "USD"})
    assert str(change) == 'pool p pricing none -> {"currency":"USD","per_replica_hour":2.5}'


def test_api_keys_are_counts_never_digests() -> None:
    old = config([make_pool("p")], base())
    new = config([make_pool("p")], base(api_keys=[DIGESTS[0], DIGESTS[3], hash_api_key("sk-other")]))
    (change,) = config_changes(old, new)
    assert (change.field, change.old, change.new) == ("api_keys", "2 keys", "3 keys")
    assert (change.keys_added, change.keys_revoked) == (2, 1)
    assert str(change) == "entitlement gold (pool p) api_keys 2 keys -> 3 keys (2 added, 1 revoked)"
    assert change.to_json() == {
        "kind": "changed", "object": "entitlement", "pool": "p", "name": "gold", "field": "api_keys",
        "old": "2 keys", "new": "3 keys", "keys_added": 2, "keys_revoked": 1,
    }  # fmt: skip
    # nothing an entitlement added or removed says names a key or a digest either
    removed = config([make_pool("p")], [base()[1]])
    everything = [*config_changes(old, new), *config_changes(old, removed), *config_changes(removed, old)]
    text = " ".join(str(c) for c in everything) + json.dumps([c.to_json() for c in everything])
    for digest in [*DIGESTS, hash_api_key("sk-other")]:
        assert digest not in text and digest[:16] not in text


def test_an_entitlement_that_moves_pool_or_tier_starts_clean() -> None:
    old = config([make_pool("p"), make_pool("q")], base())
    new = config(
        [make_pool("p"), make_pool("q")],
        [
            make_entitlement("gold", "elastic", priority=10, api_keys=DIGESTS[:2]),  # tier
            make_entitlement("silver", "spot", pool="q", weight=3.0, api_keys=[DIGESTS[2]]),  # pool and tier
        ],
    )
    changes = config_changes(old, new)
    moved = next(c for c in changes if c.name == "silver" and c.field == "pool")
    assert moved.pool == "q" and (moved.old, moved.new) == ("p", "q")
    assert fresh_starts(changes) == {
        "gold": "moved tier guaranteed -> elastic",
        "silver": "moved pool p -> q and tier elastic -> spot",
    }
    # any other change carries the state over
    same = config([make_pool("p"), make_pool("q")], base(priority=1, weight=5.0))
    assert fresh_starts(config_changes(old, same)) == {}
