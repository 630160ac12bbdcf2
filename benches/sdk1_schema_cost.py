"""What the official Python SDK 1.x spends per tool call checking our output schema, measured
in one run: dispatch_status through `call_tool` (which validates) vs the same request without
validation, and the schema check alone for the schema as served (draft-07) vs the same schema
in the 2020-12 dialect it would otherwise have.

usage: sdk1_schema_cost.py FRONT_BINARY   (starts the front with a private demo helper)
"""
import asyncio
import json
import statistics
import sys
import time

import mcp.types as types
from jsonschema import validate
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from referencing import Registry

CALLS = 200


def as_2020_12(schema):
    text = json.dumps(schema).replace("#/definitions/", "#/$defs/")
    converted = json.loads(text)
    converted["$defs"] = converted.pop("definitions", {})
    converted["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return converted


def per_call_ms(check, calls=CALLS):
    check()
    started = time.perf_counter()
    for _ in range(calls):
        check()
    return (time.perf_counter() - started) / calls * 1000


async def timed(call):
    samples = []
    for _ in range(CALLS):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


async def main() -> None:
    params = StdioServerParameters(command=sys.argv[1], args=["serve", "--demo-helper"])
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = {t.name: t for t in (await session.list_tools()).tools}
            lane = (await session.call_tool("dispatch_lanes", {})).structuredContent["lanes"][0]
            handle = (
                await session.call_tool(
                    "dispatch_unit",
                    {"orguser": lane["orguser"], "repo": lane["repo"], "task_description": "bench"},
                )
            ).structuredContent["handle"]
            final = (
                await session.call_tool("dispatch_result", {"handle": handle, "wait_seconds": 30})
            ).structuredContent

            async def validated():
                await session.call_tool("dispatch_status", {"handle": handle})

            request = types.ClientRequest(
                types.CallToolRequest(
                    params=types.CallToolRequestParams(
                        name="dispatch_status", arguments={"handle": handle}
                    )
                )
            )

            async def unvalidated():
                await session.send_request(request, types.CallToolResult)

            await validated()
            plain = await timed(unvalidated)
            checked = await timed(validated)

    schema = tools["dispatch_result"].outputSchema
    served = per_call_ms(lambda: validate(final, schema, registry=Registry()))
    later = per_call_ms(lambda: validate(final, as_2020_12(schema), registry=Registry()))
    print(f"SDK {__import__('importlib.metadata').metadata.version('mcp')}, {CALLS} calls each, "
          f"schema {len(json.dumps(schema))} bytes, dialect {schema.get('$schema')}")
    print(f"dispatch_status p50: {checked:.2f} ms through call_tool (validates) vs {plain:.2f} ms "
          f"without validation: {checked / plain:.2f}x, {checked - plain:.2f} ms per call for the check")
    print(f"schema check alone: {served:.2f} ms as served (draft-07) vs {later:.2f} ms as 2020-12: "
          f"{later / served:.1f}x cheaper")


asyncio.run(main())
