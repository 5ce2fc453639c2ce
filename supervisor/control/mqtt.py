"""The supervisor's own MQTT client: commands on the control topic, its /status document.

Off unless the shard map's ``control`` section asks for it (``control.mqtt: true`` or
``control.supervisor_topic``). paho runs its network loop in its own thread (``loop_start``);
received commands go through a queue to one worker thread, which carries them out with
:class:`supervisor.control.controller.Controller` (the same path as the HTTP API, plus the token check) and
publishes the reply on the request's MQTT 5 response topic (with its correlation data), else on
``control.reply_topic``. The worker also publishes the /status document, retained, every
``control.supervisor_interval``. Who may publish commands is the broker's business (ACLs, see
docs/control.md); retained commands are never carried out.

Bad input (:mod:`supervisor.control.admission`): a command over 64 KiB is refused unread, commands beyond
the rate limit are refused in paho's thread (they never reach the queue), and a command carried
out once is answered from memory, not carried out again, when the same bytes with the same ``id``
(or correlation data) come again (a QoS 1 redelivery). Every refusal is answered with a reason.
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
from supervisor.control.admission import BURST, MAX_COMMAND, RATE, Recent, TokenBucket, dedup_key, too_large
from supervisor.control.controller import Controller, loose_id

log = logging.getLogger(__name__)


class MqttControl:
    def __init__(self, smap: ShardMap, host: str, controller: Controller,
                 status: Callable[[], bytes] | None = None) -> None:
        self.smap = smap
        self.controller = controller
        self.status = status
        ctl = smap.control
        self.topic, self.reply_topic = control_topics(ctl.topic, ctl.reply_topic, host)
        self.status_topic = ctl.supervisor_topic.replace("{host}", host) if ctl.supervisor_topic else None
        self.interval = float(ctl.supervisor_interval)
        self.queue: queue.Queue[mqtt.MQTTMessage | None] = queue.Queue(maxsize=1000)
        self.worker = threading.Thread(target=self._work, name="shardlog-mqtt-control", daemon=True)
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
        self.refused = 0  # too large, rate limited or queue full (logged once a second at most)
        self.refused_logged = 0.0

    @staticmethod
    def wanted(smap: ShardMap) -> bool:
        return smap.control.mqtt or smap.control.supervisor_topic is not None

    def start(self) -> MqttControl:
        b = self.smap.broker
        self.client.connect_async(b.host, b.port, b.keepalive)
        self.client.loop_start()
        self.worker.start()
        if self.smap.control.mqtt:
            log.info("accepting control commands on MQTT topic %s (replies on %s)", self.topic, self.reply_topic)
        return self

    def stop(self) -> None:
        self.stopping.set()
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass
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
        why = too_large(msg.payload)
        if why is None and not msg.retain and not self.bucket.take(now):
            why = (f"rate limited: at most {RATE:g} commands a second ({BURST} at once); "
                   f"send again in {self.bucket.wait():.1f}s")
        if why is None:
            try:
                self.queue.put_nowait(msg)
                return
            except queue.Full:
                why = "too many commands waiting; send again later"
        self.refused += 1
        if now - self.refused_logged >= 1.0:
            self.refused_logged = now
            log.warning("control from mqtt %s: refused: %s (%d refused so far)", msg.topic, why, self.refused)
        ident = loose_id(msg.payload) if len(msg.payload) <= MAX_COMMAND else None
        self._reply(msg, {**({"id": ident} if isinstance(ident, (str, int)) else {}), "ok": False, "reason": why})

    # -- the worker --------------------------------------------------------------------------

    def _work(self) -> None:
        next_status = time.monotonic()
        while not self.stopping.is_set():
            timeout = max(0.0, next_status - time.monotonic()) if self.status_topic else None
            try:
                msg = self.queue.get(timeout=timeout)
            except queue.Empty:
                msg = None
            if self.stopping.is_set():
                return
            if msg is not None:
                try:
                    self._command(msg)
                except Exception as exc:  # noqa: BLE001 - one bad command must not end the worker
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
        if msg.retain:
            # a retained command would run again at every reconnect: never carried out
            log.warning("control from %s: a retained command: ignored", source)
            reply = {"ok": False, "reason": "retained commands are never carried out; publish without retain "
                                            "(and clear the retained one with an empty retained message)"}
            if not msg.payload:
                return  # the clearing message itself
            if isinstance(ident := loose_id(msg.payload), (str, int)):
                reply = {"id": ident, **reply}
        else:
            ident = loose_id(msg.payload)
            key = dedup_key(ident, correlation, msg.payload)
            now = time.monotonic()
            done = self.recent.get(key, now) if key is not None else None
            if done is not None:
                log.warning("control from %s: command %r again (a redelivery?): not carried out twice", source, ident)
                reply = {**done, "duplicate": True}
            else:
                reply = self.controller.execute(msg.payload, None, source, check_token=True)
                if key is not None and reply.get("ok"):
                    self.recent.put(key, reply, now)
        self._reply(msg, reply)

    def _reply(self, msg: mqtt.MQTTMessage, reply: dict[str, Any]) -> None:
        """Publish ``reply`` on the request's response topic (with its correlation data), else on
        the reply topic. Called from the worker and from paho's thread (publish is thread-safe)."""
        props = getattr(msg, "properties", None)
        response = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        out = None
        if self.mqtt5 and (response or correlation is not None):
            out = Properties(PacketTypes.PUBLISH)
            if correlation is not None:
                out.CorrelationData = correlation
        self.client.publish(response or self.reply_topic, msgspec.json.encode(reply), qos=1,
                            properties=out)
