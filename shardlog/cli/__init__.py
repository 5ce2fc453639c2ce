"""The ``shardlog`` command: one module per group of verbs."""
