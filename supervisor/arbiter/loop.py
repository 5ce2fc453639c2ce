"""The supervisor's main loop: one recorder process per shard, kept running.

Shaped like gunicorn's arbiter, without the god class: signal handlers only
append the signal to a queue (:mod:`~supervisor.arbiter.inbox`; ``signal.set_wakeup_fd``
wakes the loop); one loop calls :meth:`Arbiter.step`, which dispatches queued
signals and control jobs to small ``handle_*`` methods, reaps exited children,
checks heartbeats and kill deadlines, starts shards that are due and publishes a
snapshot for the HTTP thread. The work itself is done by one module per job:
:mod:`~supervisor.arbiter.starts`, :mod:`~supervisor.arbiter.stops`,
:mod:`~supervisor.arbiter.exits`, :mod:`~supervisor.arbiter.health`,
:mod:`~supervisor.arbiter.commands` and :mod:`~supervisor.arbiter.report`. Every
state change goes through :func:`supervisor.shards.states.transition` and every
restart decision through :mod:`supervisor.shards.backoff`. Time comes from an
injectable clock and processes from an injectable ``spawn``, so tests drive
:meth:`step` with a fake clock, fake children and injected signals.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import socket
import tempfile
import time

from shardlog.config.load import shards_for_host
from shardlog.config.schema import ConfigError, ShardMap
from supervisor.arbiter import exits, health, reload, report, stops
from supervisor.arbiter.commands import Action, decide
from supervisor.arbiter.inbox import Inbox
from supervisor.arbiter.runtime import After, Clock, Intent, ShardRuntime, SystemClock, fresh_start, remove_stats
from supervisor.arbiter.sdnotify import Notifier
from supervisor.arbiter.starts import Starter
from supervisor.broker.supervised import EmbeddedBroker
from supervisor.control.controller import Job
from supervisor.shards import backoff
from supervisor.shards.process import Spawn, child_env, default_env, popen_spawn, send, signal_name
from supervisor.shards.shardmap import ShardSpec, diff, specs, write_copy
from supervisor.shards.states import PROCESS_STATES, ShardState
from supervisor.snapshot import EMPTY, Snapshot

log = logging.getLogger(__name__)

EX_OK, EX_SOFTWARE = 0, 70
#: longest sleep of the main loop (heartbeats are checked at least this often)
TICK = 0.25


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
        self.rand = rand
        self.notifier = notifier or Notifier({})
        self.env = child_env(default_env() if env is None else env)
        self.pid = os.getpid()
        self.shards: dict[str, ShardRuntime] = {}
        self.inbox = Inbox()
        self.signals = self.inbox.signals  # the queue the signal handler appends to
        self.starter = Starter(spawn, self.env, self.pid, log_level, rand)
        self.announcer = report.Announcer(self.notifier)
        self.run_dir = ""
        self.map_copy = self.map_path
        self.generation = 0
        self.stopping = False
        self.stop_now = False
        self.stop_began: float | None = None
        self.done = False
        self.exit_code = EX_OK
        self.reloads = 0
        self.started_mono = self.clock.monotonic()
        self.started_wall = self.clock.time()
        self.snapshot: Snapshot = EMPTY
        self.broker: EmbeddedBroker | None = None  # broker.embedded: true

    # -- settings read at use, so a reload applies them --------------------------------------

    @property
    def policy(self) -> backoff.Restart:
        return self.smap.supervisor.restart

    @property
    def heartbeat(self) -> float:
        return health.beat_interval(self.smap.supervisor.heartbeat_timeout)

    @property
    def spawn(self) -> Spawn:
        return self.starter.spawn

    @spawn.setter
    def spawn(self, spawn: Spawn) -> None:
        self.starter.spawn = spawn

    @property
    def ready(self) -> bool:
        """Every shard has subscribed (or failed) once: systemd was told READY=1."""
        return self.announcer.ready

    # -- setup and teardown ---------------------------------------------------------------------

    def boot(self, run_dir: str | None = None) -> None:
        """Create the run directory, freeze the map, schedule every shard's first start."""
        self.run_dir = self.starter.run_dir = run_dir or tempfile.mkdtemp(prefix="shardlog-")
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
        self.starter.gate = now
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

    # -- what other threads and the signal handler call --------------------------------------------

    def enqueue(self, signum: int, frame: object = None) -> None:
        """The signal handler: only enqueue (set_wakeup_fd wakes the loop)."""
        self.inbox.enqueue(signum, frame)

    def submit(self, job: Job) -> None:
        """From another thread: queue a stop/start for the main loop and wake it."""
        self.inbox.submit(job)

    def control_path(self, name: str) -> str | None:
        """The control socket of shard ``name``'s recorder (None if the path would be too long)."""
        return self.starter.control_path(name)

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> int:
        """Boot, loop until every shard has stopped, clean up. Returns the exit code."""
        self.inbox.install()
        try:
            self.boot()
            while not self.done:
                self.step()
                if not self.done:
                    self.inbox.wait(self.next_timeout())
        except Exception:
            log.exception("internal error in the supervisor; stopping every shard")
            self.emergency_stop()
            self.exit_code = EX_SOFTWARE
        finally:
            self.inbox.restore()
            self.cleanup()
        log.info("supervisor stopped (exit %d)", self.exit_code)
        return self.exit_code

    def step(self) -> None:
        """One turn of the loop; never blocks."""
        now = self.clock.monotonic()
        while self.signals:
            self.handle_signal(self.signals.popleft(), now)
        while self.inbox.jobs:
            self.handle_job(self.inbox.jobs.popleft(), now)
        if self.broker is not None:
            self.broker.step(now, self.clock.time())
        for rt in list(self.shards.values()):
            if rt.child is not None and (code := rt.child.poll()) is not None:
                self.handle_exit(rt, code, now)
        for rt in list(self.shards.values()):
            if rt.child is not None and health.check_heartbeat(rt, now, self.smap.supervisor.heartbeat_timeout):
                self.handle_hung(rt, now)
        for rt in self.shards.values():
            if stops.check_kill(rt, now, self.stopping):
                self.exit_code = EX_SOFTWARE
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
        self.announcer.tick(list(self.shards.values()), self.stopping, now)
        self.publish(now)

    def next_timeout(self) -> float:
        now = self.clock.monotonic()
        due = [now + TICK]
        if not self.stopping:  # a start waiting for a reload's stops: their exit (SIGCHLD) wakes the loop
            due += self.starter.next_due(self.shards)
        due += [rt.kill_at for rt in self.shards.values() if rt.kill_at is not None]
        if (w := self.announcer.next_due()) is not None:
            due.append(w)
        if self.broker is not None and (b := self.broker.next_due(now)) is not None:
            due.append(b)
        return max(0.0, min(due) - now)

    def start_due(self, now: float) -> None:
        if self.stopping:
            return
        if self.broker is not None and not self.broker.ready:
            return  # the embedded broker is starting: the shards follow when it accepts connections
        self.starter.start_due(self.shards, now, self.clock, self.map_copy, self.heartbeat, self.smap.supervisor)

    def publish(self, now: float) -> None:
        self.snapshot = Snapshot(pid=self.pid, map_path=self.map_path, host=self.host,
                                 started_wall=self.started_wall, started_mono=self.started_mono, mono=now,
                                 ready=self.ready, stopping=self.stopping, reloads=self.reloads,
                                 shards=tuple(report.shard_view(rt) for rt in self.shards.values()),
                                 broker=report.broker_view(self.broker))

    # -- signals ------------------------------------------------------------------------------------

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
            stops.kill_now(rt, now)

    def handle_hup(self, now: float) -> None:
        if self.stopping:
            log.info("stopping: reload ignored")
            return
        self.notifier.reloading(int(now * 1e6))
        try:
            new, shards = reload.load(self.map_path, self.host)
        except ConfigError as exc:
            log.error("reload failed, keeping the running map: %s", exc)
            self.notifier.ready(report.status_line(self.shards.values()))
            return
        reload.warn_restart_only(self.smap, new)
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
                fresh_start(rt, now)
        self.notifier.ready(report.status_line(self.shards.values()))

    # -- control commands (supervisor.control) -----------------------------------------------------

    def handle_job(self, job: Job, now: float) -> None:
        rt = self.shards.get(job.target.shard)
        action, reply = decide(job.target, rt, self.stopping, list(self.shards))
        if action is Action.SHUTDOWN:
            log.info("stop requested by a control command (%s)", job.source)
            self.begin_shutdown(now)
        elif action is Action.STOP and rt is not None:
            self.request_stop(rt, Intent.OPERATOR, now)
            rt.reason = "stopped by a control command"
        elif action is Action.START and rt is not None:
            log.info("shard %s: started by a control command (%s)", rt.name, job.source)
            fresh_start(rt, now)
            rt.after_reload = False
        job.finish(reply)

    # -- one shard's process ----------------------------------------------------------------------

    def handle_exit(self, rt: ShardRuntime, returncode: int, now: float) -> None:
        after = exits.on_exit(rt, returncode, now, self.clock.time(), stopping=self.stopping,
                              settings=self.smap.supervisor, rand=self.rand)
        self._after(rt, after, now)

    def handle_hung(self, rt: ShardRuntime, now: float) -> None:
        stops.abort_hung(rt, now, self.smap.supervisor.stop_timeout)

    def request_stop(self, rt: ShardRuntime, intent: Intent, now: float) -> None:
        self._after(rt, stops.request_stop(rt, intent, now, self.smap.supervisor.stop_timeout), now)

    def replace(self, rt: ShardRuntime, spec: ShardSpec, now: float) -> None:
        """Restart ``rt`` with a new spec: stop first, start after it exited (one client id)."""
        rt.pending = spec
        if rt.state in PROCESS_STATES:
            self.request_stop(rt, Intent.REPLACE, now)
        else:
            self._after(rt, After.START_PENDING, now)

    def _after(self, rt: ShardRuntime, after: After, now: float) -> None:
        if after is After.FORGET:
            self.shards.pop(rt.name, None)
            remove_stats(rt)
        elif after is After.START_PENDING:
            assert rt.pending is not None
            rt.spec, rt.pending = rt.pending, None
            fresh_start(rt, now)

    def emergency_stop(self) -> None:
        live = [rt.child for rt in self.shards.values() if rt.child is not None]
        for child in live:
            send(child, signal.SIGTERM)
        deadline = time.monotonic() + self.smap.supervisor.stop_timeout
        while time.monotonic() < deadline and any(child.poll() is None for child in live):
            time.sleep(0.05)
        for child in live:
            if child.poll() is None:
                send(child, signal.SIGKILL)
        if self.broker is not None:
            self.broker.kill()

