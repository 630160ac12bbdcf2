"""Many concurrent callers on one official-Python-SDK session, as an agent that fans out units:
each dispatches, asks for the status, and waits for the result. Prints one JSON object (tool
errors with their text, final statuses) for the Rust test to check.

usage: python_sdk_concurrent.py FRONT_BINARY HELPER_SOCKET ORGUSER REPO TASK CALLERS
"""
import asyncio
import json
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


def field(obj, snake: str, camel: str):
    return getattr(obj, snake) if hasattr(obj, snake) else getattr(obj, camel)


async def caller(session, errors, statuses, orguser, repo, task, n):
    async def call(tool, args):
        result = await session.call_tool(tool, args)
        if field(result, "is_error", "isError"):
            errors.append({"caller": n, "tool": tool, "text": result.content[0].text})
            return None
        return field(result, "structured_content", "structuredContent")

    dispatched = await call(
        "dispatch_unit", {"orguser": orguser, "repo": repo, "task_description": f"{task} #{n}"}
    )
    if dispatched is None:
        return
    handle = dispatched["handle"]
    await call("dispatch_status", {"handle": handle})
    await call("dispatch_list", {"limit": 5})
    result = await call("dispatch_result", {"handle": handle, "wait_seconds": 120})
    if result is not None:
        statuses.append(result["status"])


async def main() -> None:
    front, socket, orguser, repo, task, callers = sys.argv[1:7]
    params = StdioServerParameters(command=front, args=["serve", "--socket", socket])
    errors, statuses = [], []
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            await asyncio.gather(
                *(
                    caller(session, errors, statuses, orguser, repo, task, n)
                    for n in range(int(callers))
                )
            )
    print(json.dumps({"errors": errors, "statuses": statuses}))


asyncio.run(main())
