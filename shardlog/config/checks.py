"""Checks of a shard map that look at more than one key: where the roots lie, which topics the
control topics would swallow, the supervisor's listen address.

:func:`check_layout` runs after the roots are resolved (it reads the file system only to resolve
symlinks with ``os.path.realpath``: nothing is created). Everything else here is pure. Each
refusal is a ConfigError naming the key, so ``shardlog check``, ``record`` and ``supervise``
all exit 78 on it (docs/reliability.md, "bad input").
"""

from __future__ import annotations

import os
import re

from shardlog.config.schema import ConfigError, Control, ShardMap

#: roots refused outright: deleting a topic there would delete the system's own directories
SYSTEM_DIRS = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media",
    "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var",
    "/usr/local", "/var/lib", "/var/log", "/var/tmp", "/var/cache", "/var/spool", "/var/run",
})
#: and nothing below these (the kernel's, the system's programs and configuration)
SYSTEM_TREES = ("/proc", "/sys", "/dev", "/etc", "/boot", "/bin", "/sbin", "/lib", "/lib32", "/lib64",
                "/libx32", "/usr/bin", "/usr/sbin", "/usr/lib", "/usr/lib32", "/usr/lib64",
                "/usr/libx32", "/usr/include", "/usr/share", "/usr/src")
#: first levels that make a subscription filter of a prefix, never a topic a broker delivers
SUBSCRIPTION_ONLY = ("$share", "$queue")
HOST = "{host}"


# -- roots ---------------------------------------------------------------------------------


def _inside(path: str, other: str) -> bool:
    """``path`` lies strictly below ``other`` (both resolved)."""
    return path != other and path.startswith(other.rstrip(os.sep) + os.sep)


def system_dir_problem(real: str) -> str | None:
    """Why a resolved root may not be used, or None."""
    if real in SYSTEM_DIRS:
        return f"a system directory{' (the whole file system)' if real == os.sep else ''}"
    for tree in SYSTEM_TREES:
        if real == tree or _inside(real, tree):
            return f"inside the system directory {tree}"
    return None


def check_layout(smap: ShardMap) -> None:
    """Refuse roots that resolve to a system directory, and any two shards whose roots differ
    but lie one inside the other: one shard's topic directories (what ``rm`` and ``mv`` act
    on) could then hold the other's branch and lock. Shards may share a root (the router then
    keeps their branches apart) or use roots apart from each other."""
    reals: list[str] = []
    for i, s in enumerate(smap.shards):
        real = os.path.realpath(s.root)
        problem = system_dir_problem(real)
        if problem:
            resolved = f" (resolves to {real})" if real != s.root else ""
            raise ConfigError(f"shards[{i}].root: {s.root!r}{resolved} is {problem}; a shard records "
                              "into a directory of its own (e.g. /srv/shardlog/data)")
        for j, other in enumerate(reals):
            if _inside(real, other) or _inside(other, real):
                inner, outer = (i, j) if _inside(real, other) else (j, i)
                raise ConfigError(
                    f"shards[{i}].root: {real} and shards[{j}].root {other} lie one inside the other "
                    f"(shards[{inner}] {smap.shards[inner].name!r} inside shards[{outer}] "
                    f"{smap.shards[outer].name!r}): one shard's topic directories could hold the other's "
                    "branch and lock, and an rm there would delete them; give both the same root or "
                    "roots apart")
        for j, other in enumerate(reals):
            t = smap.shards[j]
            if other == real and smap.broker_of(t) != smap.broker_of(s) and _nest(s.branch, t.branch):
                raise ConfigError(
                    f"shards[{i}].root: shards[{i}] {s.name!r} (prefix {s.prefix or '#'!r}) and shards[{j}] "
                    f"{t.name!r} (prefix {t.prefix or '#'!r}) record different brokers into one root {real} and "
                    "their branches nest: each would write its broker's topics into the other's directories "
                    "(shards route only against shards of their own broker); give one of them its own root")
        reals.append(real)


def _nest(a: str, b: str) -> bool:
    """One branch is the other or lies below it (``""``, the catch-all, holds every other)."""
    return a == "" or b == "" or a == b or a.startswith(b + "/") or b.startswith(a + "/")


# -- control topics ------------------------------------------------------------------------


def _level_rx(level: str) -> re.Pattern[str]:
    return re.compile(re.escape(level).replace(re.escape(HOST), "[^/]+"), re.S)


def overlaps_branch(template: str, branch: str) -> bool:
    """Could a topic matching ``template`` (``{host}``: any text within a level) or one below
    it lie in ``branch``, or ``branch`` lie inside it? ``branch`` is a plain topic."""
    levels, blevels = template.split("/"), branch.split("/")
    return all(_level_rx(p).fullmatch(b) for p, b in zip(levels, blevels, strict=False))


def could_be_equal(a: str, b: str) -> bool:
    """Could two templates name the same topic on one host (``{host}`` the same in both)?"""
    la, lb = a.split("/"), b.split("/")
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb, strict=True):
        if x == y:
            continue
        if HOST in x and HOST in y:
            return False  # the same host in both: different text around it never meets
        pat, lit = (x, y) if HOST in x else (y, x)
        if HOST not in pat or not _level_rx(pat).fullmatch(lit):
            return False
    return True


def check_control_topics(smap: ShardMap) -> None:
    """With control over MQTT: the control and reply topics, never recorded, must lie outside
    every named prefix (else those messages are acknowledged and dropped), their first level must
    be fixed text (``{host}`` there swallows every topic), and no reply or status document may
    be published on the control topic (it would be read back as a command: a loop)."""
    c: Control = smap.control
    if not c.mqtt:
        return
    reply = c.reply_topic or c.topic + "/reply"
    unrecorded = [("topic", c.topic)] + ([("reply_topic", c.reply_topic)] if c.reply_topic else [])
    for key, template in unrecorded:
        first = template.split("/")[0]
        if HOST in first:
            raise ConfigError(f"control.{key}: {template!r}: {{host}} in the first level matches topics of "
                              "every first level, which the recorders would then never record; start it "
                              "with fixed text (e.g. shardlog/control/{host})")
        for i, s in enumerate(smap.shards):
            if s.branch and overlaps_branch(template, s.branch):
                raise ConfigError(
                    f"control.{key}: {template!r} overlaps shards[{i}].prefix {s.prefix!r}: the control "
                    "topics are never recorded, so messages there would be acknowledged and dropped; "
                    "choose a control topic outside every shard's prefix")
    if could_be_equal(reply, c.topic):
        raise ConfigError(f"control.reply_topic: {reply!r} can be the control topic {c.topic!r}: every reply "
                          "would be read back as a command (a loop); leave it unset (<topic>/reply) or pick another")
    if c.supervisor_topic is not None and could_be_equal(c.supervisor_topic, c.topic):
        raise ConfigError(f"control.supervisor_topic: {c.supervisor_topic!r} can be the control topic "
                          f"{c.topic!r}: the /status document would be read as a command")
    for s in smap.shards if c.status_topic is not None else ():
        if could_be_equal(f"{c.status_topic}/{s.name}", c.topic):
            raise ConfigError(f"control.status_topic: {c.status_topic}/{s.name} (shard {s.name!r}'s status) can be "
                              f"the control topic {c.topic!r}: its online/offline would be read as a command")


def prefix_subscription_problem(prefix: str) -> str | None:
    """A prefix whose first level is subscription syntax (``$share/group/...``): the broker
    delivers the topics without it, so the shard would receive messages it drops."""
    first = prefix.split("/")[0]
    if first in SUBSCRIPTION_ONLY:
        return (f"{prefix!r} starts with {first}/, a shared-subscription filter, not a topic: the broker "
                "delivers its messages under their own topics, which this prefix never matches, so "
                "every one would be dropped; name the topic branch itself")
    return None


# -- the supervisor's address --------------------------------------------------------------


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port``, ``[v6addr]:port`` or ``:port`` (all interfaces) -> (host, port);
    ValueError naming ``supervisor.listen`` otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"supervisor.listen: expected HOST:PORT with a port from 0 to 65535, got {listen!r}")
    if any(ch.isspace() or ch in "/\x00" for ch in host):
        raise ValueError(f"supervisor.listen: {host!r} is not a host name or address")
    return host.strip("[]"), int(port)
