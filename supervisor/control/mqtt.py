"""The supervisor's own MQTT client: commands on the control topic, its /status document.

Off unless the shard map's ``control`` section asks for it (``control.mqtt: true`` or
``control.supervisor_topic``). paho runs its network loop in its own thread (``loop_start``);
received commands go through a queue to one worker thread, which carries them out with
:class:`supervisor.control.controller.Controller` (the same path as the HTTP API, plus the token check) and
publishes the reply on the request's MQTT 5 response topic (with its correlation data), else on
``control.reply_topic``. The worker also publishes the /status document, retained, every
``control.supervisor_interval``. Who may publish commands is the broker's business (ACLs, see
docs/control.md); retained commands are never carried out.

Bad input (:mod:`supervisor.control.admission`), decided in paho's thread before anything is queued:
a command over 64 KiB is refused unread, every message (retained ones too) takes a token of the
rate limit, a retained command is refused, and so is one whose MQTT 5 response topic cannot take
the reply (a wildcard, or a control topic: the reply would come back as a command). Refusals are
counted by kind (``/status`` ``supervisor.mqtt_control``) and logged as one line per second at
most. A command carried out once is answered from memory, not carried out again, when the same
bytes with the same ``id`` (or correlation data) come again (a QoS 1 redelivery). Every refusal is
answered with a reason; no reply is ever published to a control topic. The worker runs as a
supervised thread (:mod:`supervisor.threads`): if it dies anyway, it is logged and restarted.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from shardlog.config.schema import ShardMap
from shardlog.control.commands import control_topics
from shardlog.recording.client import apply_credentials
from supervisor.control.admission import (
    BURST,
    RATE,
    Recent,
    Refusals,
    TokenBucket,
    dedup_key,
    response_topic_problem,
    too_large,
)
from supervisor.control.controller import Controller, loose_id
from supervisor.threads import Threads

log = logging.getLogger(__name__)


class MqttControl:
    def __init__(self, smap: ShardMap, host: str, controller: Controller,
                 status: Callable[[], bytes] | None = None, threads: Threads | None = None) -> None:
        self.smap = smap
        self.controller = controller
        self.status = status
        ctl = smap.control
        self.topic, self.reply_topic = control_topics(ctl.topic, ctl.reply_topic, host)
        self.status_topic = ctl.supervisor_topic.replace("{host}", host) if ctl.supervisor_topic else None
        self.interval = float(ctl.supervisor_interval)
        self.template = ctl.topic
        self.queue: queue.Queue[mqtt.MQTTMessage | None] = queue.Queue(maxsize=1000)
        self.threads = threads if threads is not None else Threads()
        self.worker: threading.Thread | None = None
        b = smap.broker
        self.mqtt5 = b.mqtt5
        cid = f"{b.client_id_prefix}supervisor-{host}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid,
                                  protocol=mqtt.MQTTv5 if b.mqtt5 else mqtt.MQTTv311)
        apply_credentials(self.client, b)
        self.client.reconnect_delay_set(1, int(max(1, b.reconnect_max)))
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.suppress_exceptions = True  # a bug in a callback must not end paho's thread
        self.stopping = threading.Event()
        self.bucket = TokenBucket(RATE, BURST, time.monotonic())
        self.recent = Recent()
        self.refusals = Refusals()  # before a command runs (paho's thread); logged once a second at most
        self.refusals_lock = threading.Lock()  # paho's thread counts, the worker also logs the summary
        self.received = 0
        self.replies_dropped = 0  # replies with nowhere to go (their topic is a control topic)
        self.replies_dropped_logged = float("-inf")

    @staticmethod
    def wanted(smap: ShardMap) -> bool:
        return smap.control.mqtt or smap.control.supervisor_topic is not None

    def start(self) -> MqttControl:
        b = self.smap.broker
        self.client.connect_async(b.host, b.port, b.keepalive)
        if self.status_topic is not None and (why := response_topic_problem(self.status_topic, self.template)):
            log.error("control.supervisor_topic: %s; the /status document is not published", why)
            self.status_topic = None
        self.client.loop_start()
        self.worker = self.threads.start("shardlog-mqtt-control", self._work, self.stopping)
        if self.smap.control.mqtt:
            log.info("accepting control commands on MQTT topic %s (replies on %s)", self.topic, self.reply_topic)
            if (why := response_topic_problem(self.reply_topic, self.template)) is not None:
                log.error("control.reply_topic: %s; replies go only to a request's MQTT 5 response topic", why)
        return self

    def counters(self) -> dict[str, int]:
        """For /status: commands received, refused before they ran (by kind), replies dropped."""
        with self.refusals_lock:
            totals = dict(self.refusals.totals)
        return {"received": self.received, **totals, "replies_dropped": self.replies_dropped}

    def stop(self) -> None:
        self.stopping.set()
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass
        if self.worker is not None:
            self.worker.join(5)
        self.client.disconnect()
        self.client.loop_stop()

    # -- paho's thread -----------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: Any,
                    properties: object) -> None:
        if getattr(reason, "is_failure", False):
            log.error("control: broker refused the connection: %s", reason)
            return
        if self.smap.control.mqtt:
            # MQTT 5: Retain As Published, so that a retained command is recognised (and refused)
            # when it is published too, not only when the broker replays it at subscription
            if self.mqtt5:
                client.subscribe(self.topic, options=SubscribeOptions(qos=1, retainAsPublished=True))
            else:
                client.subscribe(self.topic, 1)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        self.received += 1
        if msg.retain and not msg.payload:
            return  # the empty retained message that clears a retained command: no command
        kind, why = self._admit(msg, now)
        if kind is None:
            try:
                self.queue.put_nowait(msg)
                return
            except queue.Full:
                kind, why = "queue_full", "too many commands waiting; send again later"
        with self.refusals_lock:
            alone = self.refusals.add(kind, now)
            summary = self.refusals.due(now) if not alone else None
        if alone:
            log.warning("control from mqtt %s: refused: %s (further refusals within 1s are summed in one line)",
                        msg.topic, why)
        if summary is not None:
            log.warning("control from mqtt %s: %s", msg.topic, summary)
        ident = loose_id(_payload(msg)) if kind != "too_large" else None
        self._reply(msg, {**({"id": ident} if isinstance(ident, (str, int)) else {}), "ok": False, "reason": why})

    def _admit(self, msg: mqtt.MQTTMessage, now: float) -> tuple[str | None, str]:
        """(None, "") to queue ``msg``, else (the refusal's kind, its reason). Every message takes
        a token, retained ones too: a storm of them is rate limited like any other."""
        if (why := too_large(_payload(msg))) is not None:
            return "too_large", why
        if not self.bucket.take(now):
            return "rate_limited", (f"rate limited: at most {RATE:g} commands a second ({BURST} at once); "
                                    f"send again in {self.bucket.wait():.1f}s")
        if msg.retain:  # it would run again at every reconnect: never carried out
            return "retained", ("retained commands are never carried out; publish without retain "
                                "(and clear the retained one with an empty retained message)")
        response = _response_topic(msg)
        if response is not None and (why := response_topic_problem(response, self.template)) is not None:
            return "response_topic", f"response topic {why}; the command was not carried out"
        return None, ""

    # -- the worker --------------------------------------------------------------------------

    def _work(self) -> None:
        next_status = time.monotonic()
        while not self.stopping.is_set():
            # wake at least once a second: the summary of refusals is due then
            timeout = min(1.0, max(0.0, next_status - time.monotonic())) if self.status_topic else 1.0
            try:
                msg = self.queue.get(timeout=timeout)
            except queue.Empty:
                msg = None
            if self.stopping.is_set():
                return
            with self.refusals_lock:
                summary = self.refusals.due(time.monotonic())
            if summary is not None:
                log.warning("control from mqtt %s: %s", self.topic, summary)
            if msg is not None:
                try:
                    self._command(msg)
                except Exception as exc:  # one bad command must not end the worker
                    log.exception("control: error handling a command from MQTT")
                    self._reply(msg, {"ok": False, "reason": f"internal error: {exc}"})
            if self.status_topic and self.status is not None and time.monotonic() >= next_status:
                next_status = time.monotonic() + self.interval
                if self.client.is_connected():
                    self.client.publish(self.status_topic, self.status(), qos=0, retain=True)

    def _command(self, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        source = f"mqtt {msg.topic}"
        payload = _payload(msg)
        ident = loose_id(payload)
        key = dedup_key(ident, correlation, payload)
        now = time.monotonic()
        done = self.recent.get(key, now) if key is not None else None
        if done is not None:
            log.warning("control from %s: command %r again (a redelivery?): not carried out twice", source, ident)
            reply = {**done, "duplicate": True}
        else:
            reply = self.controller.execute(payload, None, source, check_token=True)
            if key is not None and reply.get("ok"):
                self.recent.put(key, reply, now)
        self._reply(msg, reply)

    def _reply(self, msg: mqtt.MQTTMessage, reply: dict[str, Any]) -> None:
        """Publish ``reply`` on the request's response topic (with its correlation data), else on
        the reply topic; never on a topic that cannot take it or would bring it back as a command
        (then it is dropped, counted and logged once a second at most). Called from the worker
        and from paho's thread (publish is thread-safe)."""
        props = getattr(msg, "properties", None)
        response = _response_topic(msg)
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        topic = response if response is not None and response_topic_problem(response, self.template) is None \
            else self.reply_topic
        if (why := response_topic_problem(topic, self.template)) is not None:
            now = time.monotonic()
            with self.refusals_lock:
                self.replies_dropped += 1
                quiet = now - self.replies_dropped_logged < 1.0
                if not quiet:
                    self.replies_dropped_logged = now
            if not quiet:
                log.warning("control: a reply dropped: %s (%d dropped so far)", why, self.replies_dropped)
            return
        out = None
        if self.mqtt5 and (response is not None or correlation is not None):
            out = Properties(PacketTypes.PUBLISH)
            if correlation is not None:
                out.CorrelationData = correlation
        self.client.publish(topic, msgspec.json.encode(reply), qos=1, properties=out)


def _payload(msg: mqtt.MQTTMessage) -> bytes:
    """paho types a received payload ``bytes | bytearray`` and delivers bytes (``bytes()`` of bytes
    is that same object, no copy); a command is read from bytes."""
    return bytes(msg.payload)


def _response_topic(msg: mqtt.MQTTMessage) -> str | None:
    props = getattr(msg, "properties", None)
    response = getattr(props, "ResponseTopic", None) if props is not None else None
    return response if isinstance(response, str) else None
