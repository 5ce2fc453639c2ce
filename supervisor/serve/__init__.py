"""What the supervisor serves: ``/status`` (JSON), ``/metrics`` (Prometheus) and the HTTP front that
reads requests within limits; plus ``shardlog status``, the client that prints ``/status``."""
