"""The built-in ``tools`` environment: the policy answers a row's prompt and may call tools on
the way (``services.environments.tools``: calculator, python). A policy turn with tool calls
gets their results back as the next observation, one ``<result>...</result>`` per call; a
turn without one is the final answer and ends the episode (the run's verifiable scorers then
score it against the row's columns)."""

from __future__ import annotations

from typing import Any

from services.environments.base import ENVIRONMENTS
from services.environments.sandbox import SandboxLimits
from services.environments.tools import TOOLS, ToolResult, find_tool_calls, run_tool


@ENVIRONMENTS.register("tools")
class ToolEnvironment:
    def __init__(self, tools: tuple[str, ...] | list[str] = ("calculator",), tool_format: str = "xml",
                 max_calls_per_turn: int = 4, system_prompt: str | None = None, limits: dict | None = None):
        unknown = sorted(set(tools) - set(TOOLS))
        if unknown:
            raise ValueError(f"no tool(s) {', '.join(unknown)} (tools: {', '.join(TOOLS)})")
        self.tools, self.tool_format = tuple(tools), tool_format
        self.max_calls_per_turn, self.system_prompt = max_calls_per_turn, system_prompt
        self.limits = SandboxLimits(**(limits or {}))

    def reset(self, row: dict[str, Any]) -> list[dict[str, str]]:
        prompt = row["prompt"]
        messages = [dict(m) for m in prompt] if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def step(self, completion: str) -> tuple[str | None, float | None, dict[str, Any]]:
        calls = find_tool_calls(completion, self.tool_format)
        if not calls:
            return None, None, {"tool_calls": 0, "tool_errors": 0}
        results = []
        for call in calls[: self.max_calls_per_turn]:
            if call.name in self.tools:
                results.append(run_tool(call, self.limits))
            else:
                results.append(ToolResult(f"error: tool {call.name!r} is not available here (tools: "
                                          f"{', '.join(self.tools)})", error=True))
        skipped = len(calls) - len(results)
        if skipped:
            results.append(ToolResult(f"error: {skipped} more call(s) skipped (at most {self.max_calls_per_turn} "
                                      "per turn)", error=True))
        observation = "\n".join(f"<result>{r.text}</result>" for r in results)
        return observation, None, {"tool_calls": len(calls), "tool_errors": sum(r.error for r in results)}
