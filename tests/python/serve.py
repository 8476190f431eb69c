"""A Python service: registers functions with aio-pika's JsonRPC, for Rust stubs to call.

Usage: serve.py <prefix>: each function is registered as `<prefix>.<name>` (the Rust client's
namespace). Prints `ready` once all are registered; closes its connection and exits on SIGTERM.
"""

import asyncio
import os
import signal
import sys

import aio_pika
from aio_pika.patterns import JsonRPC


async def multiply(*, x, y):
    return x * y


async def divide(*, a, b):
    return a / b


async def slow(*, ms):
    await asyncio.sleep(ms / 1000)
    return ms


class AppError(Exception):
    """An exception whose `value` a Rust caller receives as its typed error."""

    def __init__(self, value):
        super().__init__(f"application error {value!r}")
        self.value = value


class TypedJsonRPC(JsonRPC):
    """JsonRPC whose error replies add what amqp-tasks reads as a task's typed error: `kind` =
    `task` and the error `value` (decoded by the Rust stub into its `E` of `Result<T, E>`)."""

    def serialize_exception(self, exception):
        reply = super().serialize_exception(exception)
        if isinstance(exception, AppError):
            reply["error"].update(kind="task", value=exception.value)
        return reply


async def check_quota(*, user):
    raise AppError({"QuotaExceeded": {"user": user, "limit": 3}})


async def main():
    prefix = sys.argv[1]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    connection = await aio_pika.connect(os.environ["AMQP_URL"])
    async with connection:
        channel = await connection.channel()
        rpc = await JsonRPC.create(channel)
        for function in (multiply, divide, slow):
            await rpc.register(f"{prefix}.{function.__name__}", function, auto_delete=True)
        typed = await TypedJsonRPC.create(await connection.channel())
        await typed.register(f"{prefix}.check_quota", check_quota, auto_delete=True)
        print("ready", flush=True)
        await stop.wait()
    print("stopped", flush=True)


asyncio.run(main())
