"""Celery 5 as a peer of amqp-tasks-bench (see bench/src/peers.rs for the protocol).

Worker: `celery -A celery_peer worker --pool threads ...` (started by the bench from this folder);
it prints `ready` once it consumes and `done <count>` as `bench.sink` tasks finish.
Client: `python celery_peer.py client` prints `ready`, then reads commands on stdin:
`delay <n> <window>` sends n `bench.sink` tasks (`.delay()`, one after the other: Celery's
publish is synchronous, so the window is not used) and prints `sent <seconds>`;
`call <n> <in flight>` runs n `bench.echo(payload).get()` with that many in flight and prints
`calls <seconds> <p50 us> <p99 us>`; `quit`.

Environment: AMQP_URL, PEER_NAMESPACE. Celery's defaults otherwise: durable queue, persistent
messages, no publisher confirms (`confirm_publish` off), the worker acks a task before running it
(`acks_late` off); results of calls come back through the `rpc://` backend (one auto-delete reply
queue per client, transient replies).
"""

import os
import sys
import threading
import time

from celery import Celery
from celery.signals import worker_ready

NAMESPACE = os.environ.get("PEER_NAMESPACE", "bench")
QUEUE = f"{NAMESPACE}.celery"

app = Celery("bench", broker=os.environ["AMQP_URL"], backend="rpc://")
app.conf.update(
    task_default_queue=QUEUE,
    task_default_exchange=QUEUE,
    task_default_routing_key=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # No broadcast/control or event exchanges of global names on the shared broker.
    worker_enable_remote_control=False,
    worker_send_task_events=False,
    task_send_sent_event=False,
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
    broker_connection_retry_on_startup=True,
)

_done = 0
_lock = threading.Lock()
_wake = threading.Event()


def _report():
    reported = 0
    out = sys.__stdout__
    while True:
        _wake.wait()
        _wake.clear()
        count = _done
        if count != reported:
            out.write(f"done {count}\n")
            out.flush()
            reported = count


@app.task(name="bench.sink", ignore_result=True)
def sink(payload):
    global _done
    with _lock:
        _done += 1
    _wake.set()


@app.task(name="bench.echo")
def echo(payload):
    return len(payload)


@worker_ready.connect
def _ready(**_):
    threading.Thread(target=_report, daemon=True).start()
    sys.__stdout__.write("ready\n")
    sys.__stdout__.flush()


def percentile_us(sorted_seconds, p):
    if not sorted_seconds:
        return 0.0
    rank = max(1, min(len(sorted_seconds), -(-len(sorted_seconds) * p // 100)))
    return sorted_seconds[int(rank) - 1] * 1e6


def client():
    payload = "x" * 64
    # Connect (and declare the reply queue) before the first measurement.
    echo.delay(payload).get(timeout=60)
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        try:
            if words[:1] == ["delay"]:
                n = int(words[1])
                start = time.perf_counter()
                for _ in range(n):
                    sink.delay(payload)
                print(f"sent {time.perf_counter() - start:.6f}", flush=True)
            elif words[:1] == ["call"]:
                n, in_flight = int(words[1]), max(1, int(words[2]))
                latencies = []
                pending = []
                sent = 0
                start = time.perf_counter()
                while sent < n or pending:
                    while sent < n and len(pending) < in_flight:
                        pending.append((time.perf_counter(), echo.delay(payload)))
                        sent += 1
                    began, result = pending.pop(0)
                    if result.get(timeout=60) != len(payload):
                        raise RuntimeError("wrong answer")
                    latencies.append(time.perf_counter() - began)
                elapsed = time.perf_counter() - start
                latencies.sort()
                print(
                    f"calls {elapsed:.6f} {percentile_us(latencies, 50):.1f} "
                    f"{percentile_us(latencies, 99):.1f}",
                    flush=True,
                )
            elif words[:1] == ["quit"]:
                break
            else:
                print(f"error unknown command {line.strip()!r}", flush=True)
        except Exception as error:  # reported to the driver, which fails the peer
            print(f"error {type(error).__name__}: {error}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["client"]:
        client()
    else:
        sys.exit("usage: celery_peer.py client (the worker runs through `celery -A celery_peer`)")
