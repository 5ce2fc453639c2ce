"""The shardlog supervisor: runs one recorder process per shard and watches them.

This package imports shardlog; shardlog never imports it.
"""
