"""The recording path's front: the MQTT session in, one recorder per shard, its lock and its
stats (the supervisor's view of it)."""
