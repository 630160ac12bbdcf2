"""Drive dispatch-mcp with the official Python MCP SDK: list the tools, dispatch, wait for the
result. Prints one JSON object for the Rust test to check; exits non-zero on any failure.

usage: python_sdk_session.py FRONT_BINARY HELPER_SOCKET ORGUSER REPO TASK
"""
import asyncio
import json
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


def field(obj, snake: str, camel: str):
    """The SDK renamed its attributes to snake_case at some version; accept either."""
    return getattr(obj, snake) if hasattr(obj, snake) else getattr(obj, camel)


async def main() -> None:
    front, socket, orguser, repo, task = sys.argv[1:6]
    params = StdioServerParameters(command=front, args=["serve", "--socket", socket])
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            tools = (await session.list_tools()).tools
            dispatched = await session.call_tool(
                "dispatch_unit",
                {"orguser": orguser, "repo": repo, "task_description": task},
            )
            handle = field(dispatched, "structured_content", "structuredContent")["handle"]
            result = await session.call_tool(
                "dispatch_result", {"handle": handle, "wait_seconds": 30}
            )
            rejected = await session.call_tool(
                "dispatch_unit",
                {"orguser": orguser, "repo": "not-allowlisted", "task_description": task},
            )
            print(
                json.dumps(
                    {
                        "server": field(init, "server_info", "serverInfo").name,
                        "tools": sorted(t.name for t in tools),
                        "with_output_schema": sorted(
                            t.name for t in tools if field(t, "output_schema", "outputSchema")
                        ),
                        "with_input_schema": sorted(
                            t.name for t in tools if field(t, "input_schema", "inputSchema")
                        ),
                        "dispatch_is_error": field(dispatched, "is_error", "isError"),
                        "handle": handle,
                        "result": field(result, "structured_content", "structuredContent"),
                        "rejected_is_error": field(rejected, "is_error", "isError"),
                        "rejected_text": rejected.content[0].text,
                    }
                )
            )


asyncio.run(main())
