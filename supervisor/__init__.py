"""The shardlog supervisor: runs one recorder process per shard and watches them.

This package imports shardlog; shardlog never imports it. Its subpackages follow the data:
``shards`` (what a shard is: spec, states, restart policy, process), ``arbiter`` (the main
loop that runs them), ``snapshot`` (what the loop publishes), ``serve`` (``/status``,
``/metrics``, ``shardlog status``), ``control`` (commands over HTTP and MQTT) and ``broker``
(the embedded broker); ``cli`` wires them for ``shardlog supervise``. One line per module:
docs/architecture.md.
"""
