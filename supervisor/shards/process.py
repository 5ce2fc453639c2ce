"""Starting recorder processes and describing how they ended.

Each shard is its own ``python -m shardlog record ...`` process, started with
``subprocess.Popen`` (fork immediately followed by exec: never a forked copy of
the supervisor), in its own process group so a terminal's Ctrl-C reaches only
the supervisor, which then stops the shards in order. Children inherit stderr.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

#: what the recorder's exit codes mean (see shardlog.recording.loop)
EXIT_REASONS = {
    0: "stopped cleanly",
    64: "usage error",
    70: "internal error",
    73: "root cannot be created or written",
    75: "branch locked by another recorder",
    78: "configuration error",
}

#: environment variables that belong to the supervisor only
_PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                "LISTEN_FDNAMES")


class Child(Protocol):
    """The part of ``subprocess.Popen`` the arbiter uses (tests pass fakes)."""

    pid: int

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...


Spawn = Callable[[list[str], dict[str, str]], Child]


def popen_spawn(argv: list[str], env: dict[str, str]) -> Child:
    return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, close_fds=True, process_group=0)


def record_argv(map_path: str, shard: str, stats_file: str, heartbeat: float, parent_pid: int,
                log_level: str, control: str | None = None) -> list[str]:
    return [sys.executable, "-m", "shardlog", "record", map_path, "--shard", shard,
            "--stats-file", stats_file, "--heartbeat", f"{heartbeat:g}",
            "--parent-pid", str(parent_pid), "--log-level", log_level,
            *(["--control", control] if control else [])]


def child_env(base: Mapping[str, str]) -> dict[str, str]:
    """The recorders' environment: the supervisor's, minus systemd's notify and
    socket variables, plus PYTHONFAULTHANDLER so that the SIGABRT sent to a hung
    recorder prints every thread's traceback on stderr before it dies."""
    env = {k: v for k, v in base.items() if k not in _PRIVATE_ENV}
    env["PYTHONFAULTHANDLER"] = "1"
    return env


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass(frozen=True)
class ExitInfo:
    code: int | None      # the exit status; None when a signal ended the process
    signal: str | None    # e.g. "SIGKILL"
    reason: str
    ts: float             # Unix time it was seen

    @classmethod
    def from_returncode(cls, returncode: int, ts: float, context: str = "") -> ExitInfo:
        """``returncode`` as Popen gives it (negative: killed by that signal)."""
        if returncode < 0:
            sig = signal_name(-returncode)
            reason = f"killed by {sig}"
            code, signame = None, sig
        else:
            reason = f"exit {returncode} ({EXIT_REASONS.get(returncode, 'error')})"
            code, signame = returncode, None
        if context:
            reason = f"{context}; {reason}"
        return cls(code, signame, reason, ts)


def send(child: Child, sig: int) -> bool:
    """Signal ``child``; False if it is already gone."""
    try:
        child.send_signal(sig)
        return True
    except ProcessLookupError:
        return False


def default_env() -> dict[str, str]:
    return dict(os.environ)
