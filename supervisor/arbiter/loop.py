"""The supervisor's main loop: one recorder process per shard, kept running.

Shaped like gunicorn's arbiter, without the god class: signal handlers only
append the signal to a queue (and ``signal.set_wakeup_fd`` wakes the loop);
one loop calls :meth:`Arbiter.step`, which dispatches queued signals to small
``handle_*`` methods, reaps exited children, checks heartbeats and kill
deadlines, starts shards that are due and publishes a snapshot for the HTTP
thread. Every state change goes through :func:`supervisor.states.transition`
and every restart decision through :mod:`supervisor.backoff`. Time comes from
an injectable clock and processes from an injectable ``spawn``, so tests drive
:meth:`step` with a fake clock, fake children and injected signals.
"""

from __future__ import annotations

import enum
import logging
import os
import random
import select
import shutil
import signal
import socket
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from shardlog.config import ConfigError, ShardMap, load_map, shards_for_host
from shardlog.control import ALL
from shardlog.stats import Counters, read_stats
from supervisor.shards import backoff
from supervisor.broker.supervised import EmbeddedBroker
from supervisor.control.controller import Job, control_path
from supervisor.shards.process import (
    Child,
    ExitInfo,
    Spawn,
    child_env,
    default_env,
    popen_spawn,
    record_argv,
    send,
    signal_name,
)
from supervisor.arbiter.sdnotify import Notifier
from supervisor.shards.shardmap import ShardSpec, diff, specs, write_copy
from supervisor.snapshot import EMPTY, BrokerView, ShardView, Snapshot
from supervisor.shards.states import DEGRADED, PROCESS_STATES, Event, ShardState, transition

log = logging.getLogger(__name__)

EX_OK, EX_SOFTWARE = 0, 70
#: longest sleep of the main loop (heartbeats are checked at least this often)
TICK = 0.25
#: after SIGABRT, a hung recorder gets this long to print its traceback before SIGKILL
ABORT_GRACE = 2.0
#: during shutdown, give up on a process that survives SIGKILL this long (stuck in the kernel)
UNKILLABLE_GRACE = 5.0
STUCK_REASON = ("survives SIGKILL: blocked in the kernel (a frozen, wedged or hung file system?); "
                "replaced once it exits")


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)


class Intent(enum.Enum):
    """Why a shard is being stopped: what happens when its process has exited."""

    SHUTDOWN = "shutdown"  # the supervisor is stopping
    REMOVE = "remove"      # gone from the map (SIGHUP)
    REPLACE = "replace"    # changed in the map (SIGHUP): start it again with the new spec
    HUNG = "hung"          # heartbeat timeout: a crash, restarted with backoff
    OPERATOR = "operator"  # a stop command (shardlog stop SHARD): stays stopped until started


@dataclass
class ShardRuntime:
    """One shard as the main loop sees it (mutable; only the main loop touches it)."""

    spec: ShardSpec
    stats_file: str
    state: ShardState = ShardState.STOPPED
    child: Child | None = None
    spawned_mono: float | None = None
    spawned_wall: float | None = None
    running_since: float | None = None
    last_beat: float = 0.0
    beat_sig: tuple[int, int, int] | None = None
    counters: Counters | None = None
    restarts: int = 0
    history: backoff.History = field(default_factory=backoff.History)
    next_start: float | None = None
    reason: str | None = None
    last_exit: ExitInfo | None = None
    intent: Intent | None = None
    kill_at: float | None = None
    killed_at: float | None = None
    pending: ShardSpec | None = None
    after_reload: bool = False  # started by a reload: wait until that reload's stops are done

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None


class Arbiter:
    def __init__(self, smap: ShardMap, map_path: str, *, host: str | None = None,
                 log_level: str = "info", clock: Clock | None = None, spawn: Spawn = popen_spawn,
                 rand: backoff.Random = random.random, notifier: Notifier | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.smap = smap
        self.map_path = os.path.abspath(map_path)
        self.host = host
        self.log_level = log_level
        self.clock: Clock = clock or SystemClock()
        self.spawn = spawn
        self.rand = rand
        self.notifier = notifier or Notifier({})
        self.env = child_env(default_env() if env is None else env)
        self.pid = os.getpid()
        self.shards: dict[str, ShardRuntime] = {}
        self.signals: deque[int] = deque()
        self.jobs: deque[Job] = deque()  # stop/start commands from the HTTP or MQTT threads
        self.run_dir = ""
        self.map_copy = self.map_path
        self.generation = 0
        self.stopping = False
        self.stop_now = False
        self.stop_began: float | None = None
        self.done = False
        self.exit_code = EX_OK
        self.ready = False
        self.reloads = 0
        self.spawn_gate = 0.0
        self.last_status = ""
        self.next_watchdog = 0.0
        self.started_mono = self.clock.monotonic()
        self.started_wall = self.clock.time()
        self.snapshot: Snapshot = EMPTY
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._old_handlers: dict[int, object] = {}
        self.broker: EmbeddedBroker | None = None  # broker.embedded: true

    # -- settings read at use, so a reload applies them --------------------------------------

    @property
    def policy(self) -> backoff.Restart:
        return self.smap.supervisor.restart

    @property
    def heartbeat(self) -> float:
        """How often recorders rewrite their stats file: a fifth of the timeout, at most 1 s."""
        return max(0.05, min(1.0, self.smap.supervisor.heartbeat_timeout / 5))

    # -- setup and teardown ---------------------------------------------------------------------

    def boot(self, run_dir: str | None = None) -> None:
        """Create the run directory, freeze the map, schedule every shard's first start."""
        self.run_dir = run_dir or tempfile.mkdtemp(prefix="shardlog-")
        self._freeze_map()
        now = self.clock.monotonic()
        if self.smap.broker.embedded:
            # started first; the shards start once it accepts connections (start_due)
            self.broker = EmbeddedBroker(self.smap, os.path.join(self.run_dir, "broker.toml"), self.spawn,
                                         self.env, self.log_level, self.pid)
            self.broker.step(now, self.clock.time())
        shards = shards_for_host(self.smap, self.host)
        if not shards:
            log.warning("the shard map %s has no shards for host %s; waiting for SIGHUP",
                        self.map_path, self.host or socket.gethostname())
        for name, spec in specs(self.smap, shards).items():
            self.shards[name] = self._new_runtime(spec, now)
        self.spawn_gate = now
        log.info("supervising %d shard(s) from %s (pid %d, run dir %s)",
                 len(self.shards), self.map_path, self.pid, self.run_dir)
        self.publish(now)

    def _new_runtime(self, spec: ShardSpec, now: float) -> ShardRuntime:
        return ShardRuntime(spec=spec, stats_file=os.path.join(self.run_dir, f"{spec.name}.stats.json"),
                            next_start=now)

    def _freeze_map(self) -> None:
        self.generation += 1
        path = os.path.join(self.run_dir, f"map.{self.generation}.yaml")
        self.map_copy = write_copy(self.smap, self.map_path, path)

    def cleanup(self) -> None:
        if self.run_dir and os.path.isdir(self.run_dir):
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.notifier.close()

    # -- signals ----------------------------------------------------------------------------------

    def enqueue(self, signum: int, frame: object = None) -> None:
        """The signal handler: only enqueue (set_wakeup_fd wakes the loop)."""
        self.signals.append(signum)

    def install_signals(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            self._old_handlers[sig] = signal.signal(sig, self.enqueue)

    def restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._old_handlers.clear()
        signal.set_wakeup_fd(-1)
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._wake_r = self._wake_w = None

    # -- control commands (supervisor.control) -----------------------------------------------------

    def submit(self, job: Job) -> None:
        """From another thread: queue a stop/start for the main loop and wake it."""
        self.jobs.append(job)
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"\0")
            except OSError:  # the buffer is full: the loop is awake anyway
                pass

    def control_path(self, name: str) -> str | None:
        """The control socket of shard ``name``'s recorder (None if the path would be too long)."""
        return control_path(self.run_dir, name)

    def handle_job(self, job: Job, now: float) -> None:
        t = job.target
        if t.shard == ALL:
            if t.op == "start":
                job.finish({"ok": False, "reason": "start: name a shard"})
                return
            if self.stopping:
                job.finish({"ok": True, "note": "already stopping"})
                return
            log.info("stop requested by a control command (%s)", job.source)
            self.begin_shutdown(now)
            job.finish({"ok": True, "stopping": sorted(self.shards)})
            return
        rt = self.shards.get(t.shard)
        if rt is None:
            job.finish({"ok": False, "reason": f"no shard named {t.shard!r} here"})
            return
        if self.stopping:
            job.finish({"ok": False, "reason": "the supervisor is stopping"})
            return
        if t.op == "stop":
            if rt.state in PROCESS_STATES and rt.child is not None:
                if rt.state is ShardState.STOPPING:
                    job.finish({"ok": True, "shard": rt.name, "note": "already stopping"})
                    return
                self.request_stop(rt, Intent.OPERATOR, now)
                job.finish({"ok": True, "shard": rt.name, "stopping": rt.pid})
            else:
                self.request_stop(rt, Intent.OPERATOR, now)  # cancels a pending restart
                rt.reason = "stopped by a control command"
                job.finish({"ok": True, "shard": rt.name, "note": f"was not running ({rt.state.value})"})
            return
        # start
        if rt.child is not None:
            job.finish({"ok": True, "shard": rt.name, "note": f"already {rt.state.value}"})
            return
        log.info("shard %s: started by a control command (%s)", rt.name, job.source)
        self._fresh_start(rt, now)
        rt.after_reload = False
        job.finish({"ok": True, "shard": rt.name, "starting": True})

    def wait(self, timeout: float) -> None:
        """Sleep until a signal arrives or ``timeout`` passes."""
        if self._wake_r is None:
            time.sleep(timeout)
            return
        ready, _, _ = select.select([self._wake_r], [], [], max(0.0, timeout))
        if ready:
            try:
                while self._wake_r.recv(4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> int:
        """Boot, loop until every shard has stopped, clean up. Returns the exit code."""
        self.install_signals()
        try:
            self.boot()
            while not self.done:
                self.step()
                if not self.done:
                    self.wait(self.next_timeout())
        except Exception:
            log.exception("internal error in the supervisor; stopping every shard")
            self.emergency_stop()
            self.exit_code = EX_SOFTWARE
        finally:
            self.restore_signals()
            self.cleanup()
        log.info("supervisor stopped (exit %d)", self.exit_code)
        return self.exit_code

    def step(self) -> None:
        """One turn of the loop; never blocks."""
        now = self.clock.monotonic()
        while self.signals:
            self.handle_signal(self.signals.popleft(), now)
        while self.jobs:
            self.handle_job(self.jobs.popleft(), now)
        if self.broker is not None:
            self.broker.step(now, self.clock.time())
        for rt in list(self.shards.values()):
            if rt.child is not None:
                code = rt.child.poll()
                if code is not None:
                    self.handle_exit(rt, code, now)
        for rt in list(self.shards.values()):
            if rt.child is not None:
                self.check_heartbeat(rt, now)
        self.check_kills(now)
        self.start_due(now)
        for rt in self.shards.values():
            if rt.state is ShardState.RUNNING and backoff.note_running(rt.history, rt.running_since,
                                                                       self.policy, now):
                log.info("shard %s healthy for %gs: backoff reset", rt.name, self.policy.healthy_after)
        if self.stopping and all(rt.child is None for rt in self.shards.values()):
            if self.broker is not None:  # last, after every recorder has disconnected
                self.broker.stop(now, self.smap.supervisor.stop_timeout)
                self.broker.step(now, self.clock.time())
            if self.broker is None or self.broker.child is None:
                self.done = True
        self.notify(now)
        self.publish(now)

    def next_timeout(self) -> float:
        now = self.clock.monotonic()
        due = [now + TICK]
        gated = self._reload_stops_pending()  # their exit (SIGCHLD) wakes the loop
        for rt in self.shards.values():
            if (rt.child is None and rt.next_start is not None and not self.stopping
                    and not (gated and rt.after_reload)):
                due.append(max(rt.next_start, self.spawn_gate))
            if rt.kill_at is not None:
                due.append(rt.kill_at)
        if self.notifier.watchdog_interval:
            due.append(self.next_watchdog)
        if self.broker is not None and (b := self.broker.next_due(now)) is not None:
            due.append(b)
        return max(0.0, min(due) - now)

    # -- signal handlers --------------------------------------------------------------------------

    def handle_signal(self, signum: int, now: float) -> None:
        if signum == signal.SIGCHLD:
            return  # children are polled every step
        log.info("got %s", signal_name(signum))
        if signum == signal.SIGHUP:
            self.handle_hup(now)
        elif signum == signal.SIGTERM:
            self.handle_term(now)
        elif signum == signal.SIGINT:
            self.handle_int(now)

    def handle_term(self, now: float) -> None:
        if self.stopping:
            log.info("already stopping (send SIGINT to stop at once)")
            return
        self.begin_shutdown(now)

    def handle_int(self, now: float) -> None:
        if self.stopping:
            self.handle_stop_now(now)
        else:
            self.begin_shutdown(now)

    def begin_shutdown(self, now: float) -> None:
        log.info("stopping %d shard(s) (SIGKILL after %gs)", len(self.shards),
                 self.smap.supervisor.stop_timeout)
        self.stopping = True
        self.stop_began = now
        self.notifier.stopping()
        for rt in list(self.shards.values()):
            self.request_stop(rt, Intent.SHUTDOWN, now)

    def handle_stop_now(self, now: float) -> None:
        if self.stop_now:
            return
        log.warning("stopping now: SIGKILL to every shard (QoS 1 messages not yet acknowledged "
                    "will be redelivered to the next run)")
        self.stop_now = True
        for rt in self.shards.values():
            if rt.child is not None:
                send(rt.child, signal.SIGKILL)
                rt.kill_at = None
                rt.killed_at = now

    def handle_hup(self, now: float) -> None:
        if self.stopping:
            log.info("stopping: reload ignored")
            return
        self.notifier.reloading(int(now * 1e6))
        try:
            new = load_map(self.map_path)
            shards = shards_for_host(new, self.host)
        except ConfigError as exc:
            log.error("reload failed, keeping the running map: %s", exc)
            self.notifier.ready(self.status_line())
            return
        if (new.broker.embedded, new.broker.port, new.broker.embedded_port_311) != (
                self.smap.broker.embedded, self.smap.broker.port, self.smap.broker.embedded_port_311):
            log.warning("the embedded broker's settings changed; they apply when the supervisor restarts")
        if new.supervisor.listen != self.smap.supervisor.listen:
            log.warning("supervisor.listen changed to %s; it applies when the supervisor restarts "
                        "(still serving %s)", new.supervisor.listen, self.smap.supervisor.listen)
        old_specs = {n: rt.spec for n, rt in self.shards.items() if rt.intent is not Intent.REMOVE}
        new_specs = specs(new, shards)
        plan = diff(old_specs, new_specs)
        self.smap = new
        self.reloads += 1
        self._freeze_map()
        log.info("reloaded %s: %s", self.map_path, plan)
        for name in plan.removed:
            self.request_stop(self.shards[name], Intent.REMOVE, now)
        for name in plan.changed:
            self.replace(self.shards[name], new_specs[name], now)
        for name in plan.added:
            if name in self.shards:  # removed by an earlier reload and still stopping
                self.replace(self.shards[name], new_specs[name], now)
            else:
                rt = self._new_runtime(new_specs[name], now)
                rt.after_reload = True
                self.shards[name] = rt
        for name in plan.unchanged:
            rt = self.shards[name]
            if rt.state is ShardState.FAILED:
                log.info("shard %s: failed; retrying it after the reload", name)
                self._fresh_start(rt, now)
        self.notifier.ready(self.status_line())

    # -- stopping and replacing -------------------------------------------------------------------

    def request_stop(self, rt: ShardRuntime, intent: Intent, now: float) -> None:
        if rt.state is ShardState.STOPPING:
            # already on its way down: the newest reason decides what happens at exit
            # (keeping an earlier SIGABRT's shorter deadline)
            rt.intent = intent
            return
        if rt.state in PROCESS_STATES and rt.child is not None:
            self._set(rt, Event.STOP)
            rt.intent = intent
            rt.next_start = None
            rt.reason = {Intent.SHUTDOWN: "supervisor stopping", Intent.REMOVE: "removed from the map",
                         Intent.REPLACE: "changed in the map",
                         Intent.OPERATOR: "stopped by a control command"}.get(intent)
            log.info("stopping shard %s (pid %d): %s", rt.name, rt.child.pid, rt.reason)
            send(rt.child, signal.SIGTERM)
            send(rt.child, signal.SIGCONT)  # a stopped process must run to see the SIGTERM
            rt.kill_at = now + self.smap.supervisor.stop_timeout
            return
        # no process: cancel whatever start was pending
        self._set(rt, Event.STOP)
        rt.next_start = None
        if intent is Intent.REMOVE:
            self._forget(rt)
        elif intent is Intent.REPLACE and rt.pending is not None:
            self._apply_pending(rt, now)

    def replace(self, rt: ShardRuntime, spec: ShardSpec, now: float) -> None:
        """Restart ``rt`` with a new spec: stop first, start after it exited (one client id)."""
        rt.pending = spec
        if rt.state in PROCESS_STATES:
            self.request_stop(rt, Intent.REPLACE, now)
        else:
            self._apply_pending(rt, now)

    def _apply_pending(self, rt: ShardRuntime, now: float) -> None:
        assert rt.pending is not None
        rt.spec, rt.pending = rt.pending, None
        self._fresh_start(rt, now)

    def _fresh_start(self, rt: ShardRuntime, now: float) -> None:
        rt.history = backoff.History()
        rt.reason = None
        rt.next_start = now
        rt.after_reload = True

    def _forget(self, rt: ShardRuntime) -> None:
        self.shards.pop(rt.name, None)
        for path in (rt.stats_file, rt.stats_file + ".tmp"):
            try:
                os.unlink(path)
            except OSError:
                pass

    def _set(self, rt: ShardRuntime, event: Event) -> None:
        new = transition(rt.state, event)
        if new is not rt.state:
            log.debug("shard %s: %s -> %s (%s)", rt.name, rt.state.value, new.value, event.value)
        rt.state = new

    # -- exits ------------------------------------------------------------------------------------

    def handle_exit(self, rt: ShardRuntime, returncode: int, now: float) -> None:
        intent = rt.intent
        context = ""
        if intent is Intent.HUNG:
            context = f"hung (no heartbeat for {self.smap.supervisor.heartbeat_timeout:g}s)"
        info = ExitInfo.from_returncode(returncode, self.clock.time(), context)
        pid = rt.pid
        rt.last_exit = info
        rt.child = None
        rt.running_since = None
        rt.kill_at = rt.killed_at = None
        rt.intent = None
        final = read_stats(rt.stats_file)
        if final is not None and final.pid == pid:
            rt.counters = final
        if self.stopping or intent in (Intent.SHUTDOWN, Intent.REMOVE, Intent.OPERATOR):
            if rt.state is not ShardState.STOPPING:
                self._set(rt, Event.STOP)
            self._set(rt, Event.EXITED)
            level = logging.INFO if returncode == 0 else logging.WARNING
            log.log(level, "shard %s (pid %s) stopped: %s", rt.name, pid, info.reason)
            rt.reason = "stopped by a control command" if intent is Intent.OPERATOR else None
            if intent is Intent.REMOVE and not self.stopping:
                self._forget(rt)
            return
        if intent is Intent.REPLACE:
            self._set(rt, Event.EXITED)
            log.info("shard %s (pid %s) stopped for its new configuration: %s", rt.name, pid, info.reason)
            if rt.pending is not None:
                self._apply_pending(rt, now)
            return
        if returncode == 0 and intent is None:
            info = ExitInfo(0, None, "exit 0 without being asked to stop", info.ts)
            rt.last_exit = info
        decision = backoff.on_exit(rt.history, self.policy, now, returncode if returncode >= 0 else None,
                                   self.rand)
        rt.next_start = None if decision.retry_in is None else now + decision.retry_in
        rt.reason = decision.reason
        if decision.failed:
            self._set(rt, Event.GIVE_UP)
            log.error("shard %s (pid %s) FAILED: %s; %s", rt.name, pid, info.reason, decision.reason)
        else:
            self._set(rt, Event.CRASH)
            log.warning("shard %s (pid %s) exited: %s; %s", rt.name, pid, info.reason, decision.reason)

    # -- health -----------------------------------------------------------------------------------

    def check_heartbeat(self, rt: ShardRuntime, now: float) -> None:
        try:
            st = os.stat(rt.stats_file)
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            sig = None
        if sig is not None and sig != rt.beat_sig:
            rt.beat_sig = sig
            counters = read_stats(rt.stats_file)
            if counters is not None and counters.pid == rt.pid:
                rt.last_beat = now
                rt.counters = counters
                if rt.state is ShardState.STARTING:
                    self._set(rt, Event.BEAT)
                    rt.running_since = now
                    rt.reason = None
                    log.info("shard %s (pid %s) running", rt.name, rt.pid)
        if rt.state not in (ShardState.STARTING, ShardState.RUNNING):
            return
        limit = self.smap.supervisor.heartbeat_timeout
        if rt.state is ShardState.STARTING:
            limit += rt.spec.shard.lock_wait  # it may wait that long for the branch lock
        if now - rt.last_beat > limit:
            self.handle_hung(rt, now)

    def handle_hung(self, rt: ShardRuntime, now: float) -> None:
        assert rt.child is not None
        log.error("shard %s (pid %d) sent no heartbeat for %.1fs: aborting it (SIGABRT, traceback "
                  "on stderr), SIGKILL in %gs, then restarting it",
                  rt.name, rt.child.pid, now - rt.last_beat, self._abort_grace())
        self._set(rt, Event.STOP)
        rt.intent = Intent.HUNG
        rt.reason = "hung: no heartbeat"
        send(rt.child, signal.SIGABRT)
        send(rt.child, signal.SIGCONT)  # a SIGSTOPped process must run to take the SIGABRT
        rt.kill_at = now + self._abort_grace()

    def _abort_grace(self) -> float:
        return min(ABORT_GRACE, self.smap.supervisor.stop_timeout)

    def check_kills(self, now: float) -> None:
        for rt in self.shards.values():
            if rt.child is None:
                continue
            if rt.kill_at is not None and now >= rt.kill_at:
                log.warning("shard %s (pid %d) still running after %s; SIGKILL", rt.name, rt.child.pid,
                            "SIGABRT" if rt.intent is Intent.HUNG else "SIGTERM")
                send(rt.child, signal.SIGKILL)
                rt.kill_at = None
                rt.killed_at = now
            elif rt.killed_at is not None and self.stopping and now - rt.killed_at > UNKILLABLE_GRACE:
                log.error("shard %s (pid %d) survives SIGKILL (stuck in the kernel?); leaving it",
                          rt.name, rt.child.pid)
                rt.child = None
                self.exit_code = EX_SOFTWARE
            elif (rt.killed_at is not None and now - rt.killed_at > UNKILLABLE_GRACE
                  and rt.reason != STUCK_REASON):
                # e.g. a write blocked on a frozen or wedged file system (state D): it dies,
                # and is replaced, only when the kernel lets go; until then, say so
                log.error("shard %s (pid %d) survives SIGKILL for %gs: %s", rt.name, rt.child.pid,
                          UNKILLABLE_GRACE, STUCK_REASON)
                rt.reason = STUCK_REASON

    # -- starting ---------------------------------------------------------------------------------

    def _reload_stops_pending(self) -> bool:
        return any(rt.state is ShardState.STOPPING and rt.intent in (Intent.REMOVE, Intent.REPLACE)
                   for rt in self.shards.values())

    def start_due(self, now: float) -> None:
        if self.stopping:
            return
        if self.broker is not None and not self.broker.ready:
            return  # the embedded broker is starting: the shards follow when it accepts connections
        reload_stops = self._reload_stops_pending()
        due = sorted((rt for rt in self.shards.values()
                      if rt.child is None and rt.next_start is not None and rt.next_start <= now
                      and not (reload_stops and rt.after_reload)),
                     key=lambda rt: rt.next_start or 0.0)
        for rt in due:
            if now < self.spawn_gate:
                return
            self.spawn_shard(rt, now)
            self.spawn_gate = now + self.smap.supervisor.start_jitter * self.rand()

    def spawn_shard(self, rt: ShardRuntime, now: float) -> None:
        for path in (rt.stats_file, rt.stats_file + ".tmp"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        argv = record_argv(self.map_copy, rt.name, rt.stats_file, self.heartbeat, self.pid, self.log_level,
                           self.control_path(rt.name))
        restart = rt.state in (ShardState.BACKOFF, ShardState.FAILED)
        try:
            child = self.spawn(argv, self.env)
        except OSError as exc:
            log.error("cannot start shard %s: %s", rt.name, exc)
            self._set(rt, Event.SPAWN)
            decision = backoff.on_exit(rt.history, self.policy, now, None, self.rand)
            self._set(rt, Event.GIVE_UP if decision.failed else Event.CRASH)
            rt.next_start = None if decision.retry_in is None else now + decision.retry_in
            rt.reason = f"cannot start: {exc}; {decision.reason}"
            return
        if restart:
            rt.restarts += 1
        self._set(rt, Event.SPAWN)
        rt.child = child
        rt.spawned_mono = now
        rt.spawned_wall = self.clock.time()
        rt.last_beat = now
        rt.beat_sig = None
        rt.counters = None
        rt.next_start = None
        rt.after_reload = False
        rt.intent = None
        spec = rt.spec
        log.info("started shard %s (pid %d): %s -> %s%s", rt.name, child.pid, spec.shard.prefix or "#",
                 spec.shard.root, f" (restart {rt.restarts})" if restart else "")

    def emergency_stop(self) -> None:
        live = [rt for rt in self.shards.values() if rt.child is not None]
        for rt in live:
            send(rt.child, signal.SIGTERM)  # type: ignore[arg-type]
        deadline = time.monotonic() + self.smap.supervisor.stop_timeout
        while time.monotonic() < deadline and any(rt.child.poll() is None for rt in live):  # type: ignore[union-attr]
            time.sleep(0.05)
        for rt in live:
            if rt.child is not None and rt.child.poll() is None:
                send(rt.child, signal.SIGKILL)
        if self.broker is not None:
            self.broker.kill()

    # -- reporting --------------------------------------------------------------------------------

    def reported_state(self, rt: ShardRuntime) -> str:
        if rt.state is ShardState.RUNNING and rt.counters is not None and rt.counters.degraded:
            return DEGRADED
        return rt.state.value

    def status_line(self) -> str:
        counts: dict[str, int] = {}
        for rt in self.shards.values():
            st = self.reported_state(rt)
            counts[st] = counts.get(st, 0) + 1
        parts = ", ".join(f"{n} {st}" for st, n in sorted(counts.items()))
        failed = [rt.name for rt in self.shards.values() if rt.state is ShardState.FAILED]
        line = f"{len(self.shards)} shard(s): {parts or 'none'}"
        if failed:
            line += f"; FAILED: {', '.join(sorted(failed))}"
        return line

    def all_up(self) -> bool:
        """Every shard subscribed (or given up on, so one bad shard cannot hold the rest hostage)."""
        return all((rt.state is ShardState.RUNNING and rt.counters is not None and rt.counters.subscribed)
                   or rt.state is ShardState.FAILED for rt in self.shards.values())

    def notify(self, now: float) -> None:
        if not self.ready and not self.stopping and self.all_up():
            self.ready = True
            log.info("ready: %s", self.status_line())
            self.notifier.ready(self.status_line())
            self.last_status = self.status_line()
        if self.notifier.enabled:
            line = self.status_line()
            if line != self.last_status:
                self.last_status = line
                self.notifier.status(line)
            if self.notifier.watchdog_interval and now >= self.next_watchdog:
                self.notifier.watchdog()
                self.next_watchdog = now + self.notifier.watchdog_interval

    def publish(self, now: float) -> None:
        views = []
        for rt in self.shards.values():
            shard = rt.spec.shard
            views.append(ShardView(
                name=rt.name, state=self.reported_state(rt), pid=rt.pid,
                spawned_mono=rt.spawned_mono if rt.child is not None else None,
                spawned_wall=rt.spawned_wall if rt.child is not None else None,
                running_mono=rt.running_since, last_beat_mono=rt.last_beat if rt.child is not None else None,
                restarts=rt.restarts, last_exit=rt.last_exit, reason=rt.reason,
                next_start_mono=rt.next_start, prefix=shard.prefix, root=shard.root, host=shard.host,
                client_id=f"{rt.spec.broker.client_id_prefix}{shard.name}",
                counters=rt.counters))
        self.snapshot = Snapshot(pid=self.pid, map_path=self.map_path, host=self.host,
                                 started_wall=self.started_wall, started_mono=self.started_mono, mono=now,
                                 ready=self.ready, stopping=self.stopping, reloads=self.reloads,
                                 shards=tuple(views), broker=self._broker_view())

    def _broker_view(self) -> BrokerView | None:
        b = self.broker
        if b is None:
            return None
        return BrokerView(listen=b.listen, state=b.state, pid=b.pid,
                          spawned_mono=b.started_at if b.child is not None else None,
                          restarts=b.restarts, last_exit=b.last_exit)
