"""Republish recorded messages to a broker: ``shardlog replay``.

Records come from :func:`shardlog.history.read` (one topic or a whole branch, in
time order across rotated and gzipped segments, ``since <= ts < until``). Each is
published with its original payload bytes, QoS and retain flag, optionally under a
renamed topic prefix, either at the recorded pace (the gaps between ``ts`` values,
divided by ``speed``) or as fast as the broker takes them (``speed=None``).

MQTT 5 properties recorded with a message (the record's ``props``) are published with it
(:func:`~shardlog.replay.plan.replay_properties`): ``--rename`` changes the topic only (a
response topic stays as recorded); the message expiry is the recorded value minus the
whole seconds since the message was received, and a message whose expiry has run out is
not published (counted ``expired``), as a broker would no longer deliver it. Publishing to
an MQTT 3.1.1 broker drops the properties, with one warning for the whole replay.

The pure parts are shardlog/replay/plan.py (:func:`parse_speed`, :func:`parse_rename`,
:func:`rename_topic`, :func:`delay`, :func:`broker_from_url`). The side effects live at
the edge: :class:`~shardlog.replay.publisher.Publisher` (one paho client, driven from the
calling thread) and :func:`replay` here (the loop that paces and publishes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from shardlog.records import Record
from shardlog.replay.plan import (
    BrokerUnavailable,
    Interrupted,
    Rename,
    broker_name,
    delay,
    rename_topic,
    replay_properties,
)
from shardlog.replay.publisher import Publisher
from shardlog.topics import TopicError, topic_from_bytes

log = logging.getLogger(__name__)


class Summary(NamedTuple):
    published: int          # records published
    confirmed: int          # of them, QoS 1/2 acknowledged by the broker
    skipped: int            # records that cannot be published (a renamed topic too long, bad QoS)
    first_ts: int | None
    last_ts: int | None
    seconds: float
    expired: int = 0        # records with properties whose message expiry ran out (not published)


def replay(records: Iterable[tuple[str, Record]], publisher: Publisher, speed: float | None,
           rename: Rename | None = None, progress: Callable[[int, int | None], None] | None = None,
           clock: Callable[[], float] = time.monotonic) -> Summary:
    """Publish ``records`` (time order) through a connected ``publisher``, paced by
    ``speed`` (None: as fast as possible), then wait for every acknowledgement.
    ``progress(done, current_ts)`` is called after each record. Raises ReplayError
    (BrokerUnavailable) with a ``--since`` value to resume from."""
    start = clock()
    first_ts: int | None = None
    last_ts: int | None = None
    skipped = 0
    expired = 0
    mqtt5 = publisher.broker.mqtt5
    warned = False
    ts = None
    try:
        for topic, rec in records:
            ts = rec.ts
            if first_ts is None:
                first_ts, start = ts, clock()
            if speed is not None:
                while (wait := delay(ts, first_ts, start, speed, clock())) > 0:
                    publisher.pump(min(wait, 0.5))
                    if progress is not None:
                        progress(publisher.published + skipped, None)
            target = rename_topic(topic, rename)
            problem = None
            props: dict[str, Any] | None = {}
            if rec.props:
                try:
                    props = replay_properties(rec.props, ts, time.time_ns() // 1000)
                except (ValueError, TypeError, AttributeError) as exc:
                    problem = f"properties {rec.props!r}: {exc}"
                if props and not mqtt5:
                    if not warned:
                        log.warning("the broker speaks MQTT 3.1.1: the MQTT 5 properties of the records "
                                    "are not published (first at ts %d on %r)", ts, topic)
                        warned = True
                    props = {}
            if problem is not None:
                pass
            elif rec.qos not in (0, 1, 2) or not isinstance(rec.retain, bool):
                problem = f"qos {rec.qos!r}, retain {rec.retain!r}"
            else:
                try:
                    topic_from_bytes(target.encode("utf-8"))
                except (TopicError, UnicodeEncodeError) as exc:
                    problem = f"topic {target[:80]!r}: {exc}"
            if problem is not None:
                skipped += 1
                log.warning("cannot publish the record of %r at ts %d: %s", topic, ts, problem)
            elif props is None:
                expired += 1
            else:
                publisher.publish(target, rec.payload, rec.qos, rec.retain, ts, props)
            last_ts = ts
            if progress is not None:
                progress(publisher.published + skipped, ts)
        publisher.drain()
    except (BrokerUnavailable, KeyboardInterrupt) as exc:
        resume = publisher.oldest_unconfirmed()
        if ts is not None and (resume is None or ts < resume):
            resume = ts
        hint = f"; {publisher.confirmed:,} confirmed; to go on, replay again with --since {resume}" \
            if resume is not None else ""
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted(f"interrupted after {publisher.published:,} publishes{hint}") from None
        raise BrokerUnavailable(f"{exc}{hint}") from None
    if publisher.refused:
        raise BrokerUnavailable(f"{broker_name(publisher.broker)} refused {publisher.refused:,} of "
                                f"{publisher.published:,} publishes (first reason: {publisher.refusal})")
    return Summary(publisher.published, publisher.confirmed, skipped, first_ts, last_ts, clock() - start,
                   expired)
