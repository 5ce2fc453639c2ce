"""Control commands (docs/control.md): the HTTP and MQTT ways in, what the MQTT topic lets
through, the routing to the recorders or the main loop, and the ``shardlog rotate|rm|mv|stop|start``
verbs that send them."""
