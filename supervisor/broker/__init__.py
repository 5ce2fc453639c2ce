"""The embedded broker (``broker.embedded: true``): its configuration, the supervisor's side that
runs it, and the child process itself (``python -m supervisor.broker``)."""
