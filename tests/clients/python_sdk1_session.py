"""Every tool through the official Python MCP SDK 1.x, which checks each structured result
against the tool's output schema (and that schema against its meta-schema) and raises on any
mismatch. Prints one JSON object for the Rust test.

usage: python_sdk1_session.py FRONT_BINARY HELPER_SOCKET ORGUSER REPO
"""
import asyncio
import json
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


async def main() -> None:
    front, socket, orguser, repo = sys.argv[1:5]
    params = StdioServerParameters(command=front, args=["serve", "--socket", socket])
    report = {"checked": {}, "schemas": {}}
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            for tool in (await session.list_tools()).tools:
                report["schemas"][tool.name] = (tool.outputSchema or {}).get("$schema")

            async def call(name, arguments):
                result = await session.call_tool(name, arguments)
                report["checked"][name] = not result.isError
                return result.structuredContent

            await call("dispatch_lanes", {})
            handle = (
                await call(
                    "dispatch_unit",
                    {"orguser": orguser, "repo": repo, "task_description": "exit:0"},
                )
            )["handle"]
            await call("dispatch_status", {"handle": handle})
            report["status"] = (
                await call("dispatch_result", {"handle": handle, "wait_seconds": 30})
            )["status"]
            await call("dispatch_list", {"detail": True})
            await call("dispatch_cancel", {"handle": handle})
            await call("dispatch_delete", {"handle": handle})
    print(json.dumps(report))


asyncio.run(main())
