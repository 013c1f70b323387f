"""Tool calling: `tools` / `tool_choice` / `parallel_tool_calls` on chat completions.

Format (Hermes / Qwen style): the model answers a call as

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

one block per call, separated by a newline. `required` and a named `tool_choice` constrain the
whole answer to such blocks with a Lark grammar (each `arguments` object follows the tool's
JSON Schema); `auto` allows either such blocks or free text that does not start with `<`;
`none` leaves the output free (tools are not shown to the model).

Templates: when the model's chat template mentions `tools`, the tools are passed to it and the
messages keep their `tool_calls` / `tool` roles. Otherwise (SmolLM2's ChatML template) Ember
uses a documented fallback: a system-prompt section describing the tools and the format above,
assistant `tool_calls` rendered as `<tool_call>` blocks in the content, and `tool` results
rendered by the template as the `tool` role with content `<tool_response>...</tool_response>`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ember.chat_template import normalize_message
from ember.server.errors import bad_request
from ember.server.structured_protocol import (DeltaFunctionCall, DeltaToolCall, FunctionCall,
                                              NamedToolChoice, ToolCall, ToolDefinition)
from ember.types import StructuredOutputsParams

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_PARALLEL_CALLS = 4
"""Most calls one answer may hold (keeps a looping model from running to max_tokens)."""
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CALL_RE = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


@dataclass
class ToolPlan:
    """How one request uses its tools."""

    tools: list[ToolDefinition]
    mode: str
    """'none', 'auto', 'required' or 'named'."""
    parallel: bool
    named: str | None = None

    @property
    def active(self) -> bool:
        return self.mode != "none" and bool(self.tools)

    def constraint(self) -> StructuredOutputsParams | None:
        """The grammar of the answer (None: unconstrained)."""
        if not self.active:
            return None
        tools = [t for t in self.tools if self.mode != "named" or t.function.name == self.named]
        return StructuredOutputsParams(grammar=tool_grammar(tools, self.parallel,
                                                            allow_text=self.mode == "auto"))


def plan_tools(tools: list[ToolDefinition] | None, choice: str | NamedToolChoice | None,
               parallel: bool | None) -> ToolPlan:
    """Validate `tools` / `tool_choice` (400 naming the field) and resolve the mode."""
    tools = list(tools or [])
    if choice is None:
        choice = "auto" if tools else "none"
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("tool names must be unique", "tools")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise bad_request(f"tool_choice names {choice.function.name!r}, which is not in "
                              f"tools", "tool_choice")
        # NOTE: a named choice forces exactly one call of that function (as OpenAI answers).
        return ToolPlan(tools, "named", False, choice.function.name)
    if choice == "required" and not tools:
        raise bad_request("tool_choice 'required' needs tools", "tool_choice")
    return ToolPlan(tools, choice, parallel is not False)


def tool_grammar(tools: list[ToolDefinition], parallel: bool, allow_text: bool) -> str:
    """A Lark grammar (llguidance dialect) of one or more tool-call blocks, or free text."""
    lines = ["start: calls | TEXT" if allow_text else "start: calls"]
    if allow_text:
        lines.append("TEXT: /[^<](?s:.)*/")
    more = f' ("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
    lines.append(f"calls: call{more}")
    lines.append(f'call: "{OPEN}" body "{CLOSE}"')
    lines.append("body: " + " | ".join(f"body_{i}" for i in range(len(tools))))
    for i, tool in enumerate(tools):
        schema = dict(tool.function.parameters or {"type": "object"})
        schema["x-guidance"] = _JSON_STYLE
        head = json.dumps(f'{{"name": "{tool.function.name}", "arguments": ')
        lines.append(f'body_{i}: {head} args_{i} "}}"')
        lines.append(f"args_{i}: %json {json.dumps(schema)}")
    return "\n".join(lines) + "\n"


# ---- prompts --------------------------------------------------------------------------------


def tools_system_prompt(tools: list[ToolDefinition]) -> str:
    """The fallback description of the tools, for templates without tool support."""
    described = "\n".join(json.dumps({"name": t.function.name,
                                      "description": t.function.description or "",
                                      "parameters": t.function.parameters or {}})
                          for t in tools)
    return ("You can call these tools:\n" + described + "\n"
            f"To call a tool, answer only with {OPEN}{{\"name\": <tool name>, \"arguments\": "
            f"<arguments object>}}{CLOSE}, one block per call.")


def template_supports_tools(template: str | None) -> bool:
    return template is not None and "tools" in template


def prepare_messages(messages: list[dict[str, Any]], tools: list[ToolDefinition],
                     native: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Messages (and extra template variables) for the chat template, with the fallback
    rendering when the template has no tool support (`native` False)."""
    if native:
        for m in messages:
            for call in m.get("tool_calls") or []:  # templates expect arguments as an object
                call["function"]["arguments"] = _loads(call["function"]["arguments"])
        extra = {"tools": [t.model_dump(exclude_none=True) for t in tools]} if tools else {}
        return messages, extra
    out: list[dict[str, Any]] = []
    for m in messages:
        m = normalize_message(m)  # content parts joined into one string
        calls = m.pop("tool_calls", None)
        if calls:
            blocks = "\n".join(
                OPEN + json.dumps({"name": c["function"]["name"],
                                   "arguments": _loads(c["function"]["arguments"])}) + CLOSE
                for c in calls)
            m["content"] = ((m.get("content") or "") + "\n" + blocks).lstrip("\n")
        if m["role"] == "tool":
            m["content"] = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            m.pop("tool_call_id", None)
        out.append(m)
    if tools:
        section = tools_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = dict(out[0], content=f"{out[0].get('content') or ''}\n\n{section}".strip())
        else:
            out.insert(0, {"role": "system", "content": section})
    return out, {}


def _loads(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


# ---- outputs --------------------------------------------------------------------------------


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_call(body: str) -> ToolCall | None:
    """One `<tool_call>` body as a ToolCall (None when it is not a call object)."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    return ToolCall(id=new_call_id(), function=FunctionCall(
        name=value["name"], arguments=json.dumps(value.get("arguments", {}))))


def parse_tool_calls(text: str) -> list[ToolCall] | None:
    """The calls of a complete answer, or None when it is plain text."""
    if not text.lstrip().startswith(OPEN):
        return None
    calls = [parse_call(body) for body in _CALL_RE.findall(text)]
    valid = [c for c in calls if c is not None]
    return valid or None


@dataclass
class ToolStreamParser:
    """Splits one streamed choice into content deltas and tool-call deltas.

    The first non-space text decides: `<` starts tool calls (buffered; each complete block is
    sent as one delta with id, type, name and arguments), anything else streams as content.
    """

    decided: str | None = None
    """None until the first text, then 'text' or 'tools'."""
    buffer: str = ""
    num_calls: int = 0
    calls: list[ToolCall] = field(default_factory=list)

    def feed(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        """(content delta, tool-call deltas) for the next piece of text."""
        if self.decided == "text":
            return text, []
        self.buffer += text
        if self.decided is None:
            head = self.buffer.lstrip()
            if not head:
                return "", []
            if not head.startswith("<"):
                self.decided = "text"
                content, self.buffer = self.buffer, ""
                return content, []
            self.decided = "tools"
        deltas: list[DeltaToolCall] = []
        while (end := self.buffer.find(CLOSE)) >= 0:
            start = self.buffer.find(OPEN)
            body = self.buffer[start + len(OPEN):end] if 0 <= start < end else ""
            self.buffer = self.buffer[end + len(CLOSE):]
            call = parse_call(body)
            if call is None:
                continue
            self.calls.append(call)
            deltas.append(DeltaToolCall(index=self.num_calls, id=call.id, type="function",
                                        function=DeltaFunctionCall(name=call.function.name,
                                                                   arguments="")))
            deltas.append(DeltaToolCall(index=self.num_calls, function=DeltaFunctionCall(
                arguments=call.function.arguments)))
            self.num_calls += 1
        return "", deltas

    def leftover(self) -> str:
        """Buffered text that never became a call (only when no call was parsed, matching
        the non-streamed answer, whose content is the whole text then)."""
        if self.calls or self.decided != "tools":
            return ""
        rest, self.buffer = self.buffer, ""
        return rest
