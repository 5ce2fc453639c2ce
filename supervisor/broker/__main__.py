"""``python -m supervisor.broker CONFIG.toml``: the embedded broker's child process.

It runs iotcore's native broker in a daemon thread and exits on SIGTERM/SIGINT/SIGHUP or
when the supervisor that started it is gone. rumqttd's routing logs a line per message at
ERROR: silenced unless ``--log-level debug``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from supervisor.broker.config import NAME

EX_UNAVAILABLE, EX_CONFIG = 69, 78


def main(args: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m supervisor.broker",
                                description="the embedded MQTT broker that shardlog supervise runs")
    p.add_argument("config", help="rumqttd TOML (written by shardlog supervise)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone")
    a = p.parse_args(args)
    debug = a.log_level.lower() == "debug"
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {NAME}: %(message)s")
    # rumqttd logs every packet at ERROR through its tracing spans: silence it unless debugging
    # (must happen before the native module caches the level)
    logging.getLogger("rumqttd").setLevel(logging.DEBUG if debug else logging.CRITICAL)
    try:
        from iotcore.iotcore import IotCoreBroker
    except ImportError as exc:
        print(f"{NAME}: iotcore is not installed ({exc}); pip install 'iotcore>=0.4,<0.5', "
              "or set broker.embedded: false and run a broker", file=sys.stderr)
        return EX_CONFIG
    try:
        broker = IotCoreBroker(config_path=a.config)
        broker.check_ports()
    except OSError as exc:
        print(f"{NAME}: {exc} (another broker running? use it with broker.embedded: false)", file=sys.stderr)
        return EX_UNAVAILABLE
    except Exception as exc:  # a bad config from the native side
        print(f"{NAME}: cannot start: {exc}", file=sys.stderr)
        return EX_CONFIG
    # The native run_forever never returns and has no shutdown API: run it in a daemon
    # thread and let the main thread wait for SIGTERM/SIGINT (blocked in every thread, taken
    # with sigtimedwait) or the supervisor's death, then exit at once. Nothing is lost by
    # exiting: the broker holds nothing on disk.
    stop = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            broker.run_forever()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=serve, name="rumqttd", daemon=True).start()
    print(f"{NAME}: listening on {', '.join(broker.listeners())} (iotcore; pid {os.getpid()})",
          file=sys.stderr, flush=True)
    while True:
        info = signal.sigtimedwait(stop, 1.0)
        if errors:
            print(f"{NAME}: stopped: {errors[0]}", file=sys.stderr, flush=True)
            os._exit(EX_UNAVAILABLE)
        if info is not None:
            os._exit(0)
        if a.parent_pid and os.getppid() != a.parent_pid:
            os._exit(0)  # the supervisor is gone: do not outlive it


if __name__ == "__main__":
    sys.exit(main())
