"""MCP 2025-11-25 core tasks with the official Python MCP SDK, its own typed requests and result
models (which validate our answers): a plain call, a task-augmented call, tasks/get,
tasks/result, tasks/list, tasks/cancel, then a new session (a new front process) that finds,
reads and cancels tasks the first one created. Prints one JSON object for the Rust test.

usage: python_sdk_tasks.py FRONT_BINARY HELPER_SOCKET ORGUSER REPO
"""
import asyncio
import json
import sys
from contextlib import asynccontextmanager

import mcp.types as types
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPError


@asynccontextmanager
async def session_with(front: str, socket: str):
    params = StdioServerParameters(command=front, args=["serve", "--socket", socket])
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            yield session, init


async def call_as_task(session, name, arguments, task):
    """SDK 2.3 has no task-augmented tools/call: `send_request` checks every tools/call result
    against CallToolResult. So the request goes through its dispatcher, built from and checked
    against the SDK's own 2025-11-25 models."""
    params = types.CallToolRequestParams(name=name, arguments=arguments, task=task)
    raw = await session._dispatcher.send_raw_request(
        "tools/call", params.model_dump(by_alias=True, mode="json", exclude_none=True), {}
    )
    return types.CreateTaskResult.model_validate(raw).task


async def as_task(session, arguments):
    return await call_as_task(session, "dispatch_unit", arguments, types.TaskMetadata(ttl=600_000))


async def get(session, task_id):
    request = types.GetTaskRequest(params=types.GetTaskRequestParams(task_id=task_id))
    return await session.send_request(request, types.GetTaskResult)


async def result(session, task_id):
    request = types.GetTaskPayloadRequest(params=types.GetTaskPayloadRequestParams(task_id=task_id))
    return await session.send_request(request, types.CallToolResult)


async def cancel(session, task_id):
    request = types.CancelTaskRequest(params=types.CancelTaskRequestParams(task_id=task_id))
    return await session.send_request(request, types.CancelTaskResult)


async def listed(session):
    return await session.send_request(types.ListTasksRequest(), types.ListTasksResult)


async def error_of(call):
    try:
        await call
    except MCPError as error:
        return {"code": error.error.code, "message": error.error.message}
    return None


async def main() -> None:
    front, socket, orguser, repo = sys.argv[1:5]
    report = {}
    lane = {"orguser": orguser, "repo": repo}
    async with session_with(front, socket) as (session, init):
        report["protocol"] = init.protocol_version
        tasks_capability = init.capabilities.tasks
        report["server_tasks"] = tasks_capability.model_dump(by_alias=True, exclude_none=True)
        tools = (await session.list_tools()).tools
        report["task_support"] = {
            t.name: (t.execution.task_support if t.execution else None) for t in tools
        }
        plain = await session.call_tool("dispatch_unit", {**lane, "task_description": "exit:0"})
        report["plain"] = {"is_error": plain.is_error, "status": plain.structured_content["status"]}

        created = await as_task(session, {**lane, "task_description": "exit:0"})
        report["created"] = created.model_dump(by_alias=True, mode="json")
        done = await result(session, created.task_id)
        report["result"] = {
            "is_error": done.is_error,
            "status": done.structured_content["status"],
            "handle": done.structured_content["handle"],
            "related": (done.meta or {}).get("io.modelcontextprotocol/related-task"),
        }
        report["got"] = (await get(session, created.task_id)).model_dump(by_alias=True, mode="json")
        failing = await as_task(session, {**lane, "task_description": "exit:3"})
        failed = await result(session, failing.task_id)
        report["failed"] = {
            "is_error": failed.is_error,
            "task_status": (await get(session, failing.task_id)).status,
        }
        report["cancel_finished"] = await error_of(cancel(session, created.task_id))
        report["status_as_task"] = await error_of(
            call_as_task(
                session, "dispatch_status", {"handle": created.task_id}, types.TaskMetadata()
            )
        )
        report["refused_as_task"] = await error_of(
            as_task(session, {"orguser": orguser, "repo": "not-allowlisted", "task_description": "x"})
        )
        finishing = await as_task(session, {**lane, "task_description": "sleep:2"})
        long = await as_task(session, {**lane, "task_description": "sleep:60"})
    # A new session is a new front process: the tasks are the helper's.
    async with session_with(front, socket) as (session, _):
        ids = [t.task_id for t in (await listed(session)).tasks]
        report["listed_after_restart"] = {
            "finishing": finishing.task_id in ids,
            "long": long.task_id in ids,
            "first": created.task_id in ids,
        }
        late = await result(session, finishing.task_id)
        report["finished_after_restart"] = late.structured_content["status"]
        running = await get(session, long.task_id)
        report["long_before_cancel"] = running.status
        cancelled = await cancel(session, long.task_id)
        report["cancel_answer"] = cancelled.status
        report["long_after_cancel"] = (await get(session, long.task_id)).status
        after = await result(session, long.task_id)
        report["long_result"] = {
            "is_error": after.is_error,
            "status": after.structured_content["status"],
        }
        report["unknown"] = await error_of(get(session, "d-" + "0" * 32))
    print(json.dumps(report))


asyncio.run(main())
