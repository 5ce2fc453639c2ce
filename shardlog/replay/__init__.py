"""Republishing recorded messages to a broker (``shardlog replay``)."""
