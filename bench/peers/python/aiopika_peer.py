"""aio-pika as a peer of amqp-tasks-bench (see bench/src/peers.rs for the protocol): calls with
the `JsonRPC` pattern, fire-and-forget with the `JsonMaster` pattern (aio-pika's pattern for
tasks without an answer).

`aiopika_peer.py worker` registers `<namespace>.aio-pika.echo` (JsonRPC, auto-delete queue) and
a JsonMaster worker on `<namespace>.aio-pika.sink` (durable queue); prints `ready`, then
`done <count>` as sink tasks finish; exits on SIGTERM.
`aiopika_peer.py client` prints `ready`, then reads commands on stdin: `delay <n> <window>`
(`create_task` with `window` in flight, each awaits its publisher confirm) prints
`sent <seconds>`; `call <n> <in flight>` prints `calls <seconds> <p50 us> <p99 us>`; `quit`.

Environment: AMQP_URL, PEER_NAMESPACE, PEER_PREFETCH. What aio-pika does: channels with publisher
confirms (its default); JsonRPC calls transient, `mandatory`, one server-named exclusive reply
queue per client (no_ack); JsonMaster tasks persistent; both workers ack after running
(JsonRPC after publishing the reply).
"""

import asyncio
import os
import signal
import sys
import time

import aio_pika
from aio_pika.patterns import JsonMaster, JsonRPC

NAMESPACE = os.environ.get("PEER_NAMESPACE", "bench")
ECHO = f"{NAMESPACE}.aio-pika.echo"
SINK = f"{NAMESPACE}.aio-pika.sink"
PREFETCH = int(os.environ.get("PEER_PREFETCH", "64"))


def percentile_us(sorted_seconds, p):
    if not sorted_seconds:
        return 0.0
    rank = max(1, min(len(sorted_seconds), -(-len(sorted_seconds) * p // 100)))
    return sorted_seconds[int(rank) - 1] * 1e6


async def worker():
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    done = 0
    wake = asyncio.Event()

    async def echo(*, payload):
        return len(payload)

    async def sink(*, payload):
        nonlocal done
        done += 1
        wake.set()

    async def report():
        reported = 0
        while True:
            await wake.wait()
            wake.clear()
            if done != reported:
                reported = done
                sys.stdout.write(f"done {reported}\n")
                sys.stdout.flush()

    connection = await aio_pika.connect(os.environ["AMQP_URL"])
    async with connection:
        rpc_channel = await connection.channel()
        await rpc_channel.set_qos(prefetch_count=PREFETCH)
        rpc = await JsonRPC.create(rpc_channel)
        await rpc.register(ECHO, echo, auto_delete=True)
        master_channel = await connection.channel()
        await master_channel.set_qos(prefetch_count=PREFETCH)
        master = JsonMaster(master_channel)
        await master.create_worker(SINK, sink, durable=True)
        reporter = asyncio.ensure_future(report())
        print("ready", flush=True)
        await stop.wait()
        reporter.cancel()
        await rpc.close()


async def client():
    connection = await aio_pika.connect(os.environ["AMQP_URL"])
    payload = "x" * 64
    async with connection:
        rpc = await JsonRPC.create(await connection.channel())
        master = JsonMaster(await connection.channel())
        await rpc.call(ECHO, kwargs={"payload": payload})
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            words = line.split()
            try:
                if words[:1] == ["delay"]:
                    n, window = int(words[1]), max(1, int(words[2]))
                    start = time.perf_counter()
                    in_flight = set()
                    for _ in range(n):
                        if len(in_flight) >= window:
                            finished, in_flight = await asyncio.wait(
                                in_flight, return_when=asyncio.FIRST_COMPLETED
                            )
                            for task in finished:
                                task.result()
                        in_flight.add(
                            asyncio.ensure_future(
                                master.create_task(SINK, kwargs={"payload": payload})
                            )
                        )
                    for task in asyncio.as_completed(in_flight):
                        await task
                    print(f"sent {time.perf_counter() - start:.6f}", flush=True)
                elif words[:1] == ["call"]:
                    n, in_flight = int(words[1]), max(1, int(words[2]))
                    latencies = []

                    async def calls(count):
                        for _ in range(count):
                            began = time.perf_counter()
                            answer = await rpc.call(ECHO, kwargs={"payload": payload})
                            if answer != len(payload):
                                raise RuntimeError("wrong answer")
                            latencies.append(time.perf_counter() - began)

                    start = time.perf_counter()
                    await asyncio.gather(
                        *(
                            calls(n // in_flight + (1 if index < n % in_flight else 0))
                            for index in range(in_flight)
                        )
                    )
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
        await rpc.close()


if __name__ == "__main__":
    role = sys.argv[1:2]
    if role == ["worker"]:
        asyncio.run(worker())
    elif role == ["client"]:
        asyncio.run(client())
    else:
        sys.exit("usage: aiopika_peer.py worker|client")
