"""shardlog: record an MQTT topic tree as a directory tree of JSON Lines files."""

__version__ = "0.1.0"
