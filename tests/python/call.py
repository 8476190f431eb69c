"""Calls methods with aio-pika's JsonRPC, as a Python service does, and reports what each call
returned or raised; the Rust tests (tests/tests/python.rs) make the assertions.

Usage: call.py '<cases>', a JSON list of {"method", "kwargs", "wait" (seconds the caller waits,
with asyncio.wait_for), and optionally "expiration" and "priority" (passed to JsonRPC.call) and
"pickle": true (call with the pickle-based `RPC` pattern instead). The cases run concurrently. Prints one line, `RESULTS <json list>`, with
{"result": value} or {"raised": class name, "args": [...]} per case, plus "elapsed" (seconds).
"""

import asyncio
import json
import os
import sys
import time

import aio_pika
from aio_pika.patterns import RPC, JsonRPC


def jsonable(value):
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


async def run(rpcs, case):
    rpc = rpcs["pickle" if case.get("pickle") else "json"]
    options = {key: case[key] for key in ("expiration", "priority") if key in case}
    started = time.monotonic()
    try:
        call = rpc.call(case["method"], kwargs=case.get("kwargs"), **options)
        result = await asyncio.wait_for(call, case.get("wait", 10))
        outcome = {"result": result}
    except Exception as error:  # every exception is an outcome to report
        outcome = {
            "raised": type(error).__name__,
            "args": [jsonable(arg) for arg in error.args],
        }
    outcome["elapsed"] = time.monotonic() - started
    return outcome


async def main():
    cases = json.loads(sys.argv[1])
    connection = await aio_pika.connect(os.environ["AMQP_URL"])
    async with connection:
        channel = await connection.channel()
        rpcs = {
            "json": await JsonRPC.create(channel),
            "pickle": await RPC.create(await connection.channel()),
        }
        outcomes = await asyncio.gather(*(run(rpcs, case) for case in cases))
        for rpc in rpcs.values():
            await rpc.close()
    print("RESULTS " + json.dumps(outcomes), flush=True)


asyncio.run(main())
