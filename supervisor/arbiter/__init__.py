"""The main loop: one recorder process per shard, kept running (see :mod:`supervisor.arbiter.loop`)."""
