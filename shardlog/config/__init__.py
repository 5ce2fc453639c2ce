"""The shard map: its schema (msgspec Structs), loading and validation, sizes and durations,
and the routing rule (which shard owns a topic)."""
