"""The registry: names, the 128 cap, byte-stable definitions, schema sanitising, result caps and paging."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import pytest

from bot.tools.base import Tool, ToolContext, ToolResult
from bot.tools.registry import (
    MAX_TOOLS,
    SchemaError,
    build_registry,
    canonical,
    cap_result,
    cap_tool_result,
    definitions_json,
    offered,
    page_text,
    registry_for,
    sanitize_schema,
)


@dataclass
class FakeTool:
    name: str
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    description: str = "does a thing"
    read_only: bool = True

    def title(self, args: dict[str, Any]) -> str:
        return self.name

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        return ToolResult(text="ok")


def test_names_outside_moonshots_pattern_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    good = ["abc", "a_b-c", "_x1", "A" * 64, "mcp__notes__search"]
    bad = ["ab", "1abc", "a b c", "a.b.c", "$web_search", "A" * 65, "ünï"]
    with caplog.at_level(logging.WARNING):
        registry = build_registry([FakeTool(n) for n in good + bad])
    assert set(registry.names) == set(good)
    assert sum("does not match" in r.getMessage() for r in caplog.records) == len(bad)


def test_duplicates_keep_the_first_and_at_most_127_tools_are_offered_leaving_room_for_read_more(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = FakeTool("dup_tool", description="first")
    tools: list[Tool] = [first, FakeTool("dup_tool", description="second")]
    tools += [FakeTool(f"tool_{i:03d}") for i in range(200)]
    with caplog.at_level(logging.WARNING):
        registry = build_registry(tools)
    assert len(registry.tools) == MAX_TOOLS - 1  # the loop's read_more makes 128
    assert registry.get("dup_tool") is first
    assert "tool_125" in registry.names and "tool_126" not in registry.names  # the first ones given win
    assert any("duplicate" in r.getMessage() for r in caplog.records)
    assert any("more than 127" in r.getMessage() for r in caplog.records)


def test_the_same_tools_give_byte_identical_definitions_whatever_the_order() -> None:
    def tools() -> list[FakeTool]:
        return [
            FakeTool(
                "zeta", {"properties": {"b": {"type": "string"}, "a": {"type": "integer"}}, "type": "object"}
            ),
            FakeTool(
                "alpha", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
            ),
            FakeTool("mid", {"type": "object", "required": ["q"], "properties": {"q": {"type": "string"}}}),
        ]

    one = build_registry(tools())
    two = build_registry(list(reversed(tools())))
    assert one.names == ("alpha", "mid", "zeta")
    assert one.definitions_json() == two.definitions_json()
    # Insertion-ordered encoders (json.dumps without sort_keys, as the openai SDK sends) agree too.
    assert json.dumps(one.definitions_list()) == json.dumps(two.definitions_list())
    first = one.definitions_list()[0]
    assert first == {
        "function": {
            "description": "does a thing",
            "name": "alpha",
            "parameters": {
                "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                "type": "object",
            },
        },
        "type": "function",
    }
    one.definitions_list()[0]["function"]["name"] = "changed"  # a copy each time
    assert one.definitions[0]["function"]["name"] == "alpha"


def test_the_registry_of_the_same_tools_is_built_once_and_a_changed_tool_rebuilds_it() -> None:
    """An answer's offer reuses the registry built for the same tool objects (issue 10: it was rebuilt,
    every schema sanitised again, for each answer)."""
    tools = [FakeTool("alpha"), FakeTool("beta")]
    first = registry_for(tools)
    assert registry_for(list(tools)) is first  # the same tools: the same registry
    assert registry_for(tools[:1]) is not first and registry_for(tools[:1]).names == ("alpha",)
    tools[1].parameters = {"type": "object", "properties": {"q": {"type": "string"}}}  # a new schema
    rebuilt = registry_for(tools)
    assert rebuilt is not first
    assert rebuilt.definitions[1]["function"]["parameters"]["properties"] == {"q": {"type": "string"}}
    tools[0].description = "does another thing"
    assert registry_for(tools).definitions[0]["function"]["description"] == "does another thing"
    assert registry_for([FakeTool("alpha"), FakeTool("beta")]) is not registry_for(tools)  # other objects


def test_canonical_orders_keys_deeply() -> None:
    value = canonical({"b": [{"z": 1, "a": 2}], "a": {"y": 1, "x": 2}})
    assert json.dumps(value) == '{"a": {"x": 2, "y": 1}, "b": [{"a": 2, "z": 1}]}'


BAD_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "definitions": {"Item": {"type": "object", "properties": {"id": {"type": "string"}}}},
    "properties": {
        "mode": {"enum": ["fast", "slow"], "description": "no type"},
        "count": {"const": 3},
        "limit": {"minimum": 1, "maximum": 10},
        "filters": {"properties": {"tag": {"type": "string"}}},
        "ids": {"items": {"type": "string"}},
        "pair": {"type": "array", "items": [{"type": "string"}, {"type": "string"}]},
        "mixed": {"type": "array", "items": [{"type": "string"}, {"type": "integer"}]},
        "item": {"$ref": "#/definitions/Item", "description": "a sibling of $ref"},
        "maybe": {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "nullable"},
        "either": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
        "listy": {"type": ["string", "null"]},
        "anything": {"description": "any value at all"},
    },
    "required": ["mode", "ghost"],
}


def test_a_bad_schema_is_sanitised_into_the_accepted_subset() -> None:
    fixed, notes = sanitize_schema(BAD_SCHEMA)
    props = fixed["properties"]
    assert "$schema" not in fixed and "definitions" not in fixed
    assert fixed["$defs"] == {"Item": {"type": "object", "properties": {"id": {"type": "string"}}}}
    assert props["mode"]["type"] == "string"
    assert props["count"]["type"] == "integer"
    assert props["limit"]["type"] == "number"
    assert props["filters"]["type"] == "object"
    assert props["ids"]["type"] == "array"
    assert props["pair"]["items"] == {"type": "string"}
    assert props["mixed"]["items"] == {"anyOf": [{"type": "string"}, {"type": "integer"}]}
    assert props["item"] == {"$ref": "#/$defs/Item"}
    assert props["maybe"] == {"type": "string", "description": "nullable"}
    assert props["either"] == {"anyOf": [{"type": "string"}, {"type": "integer"}]}
    assert props["listy"]["type"] == "string"
    assert "anything" not in props  # optional and untypable: dropped
    assert fixed["required"] == ["mode"]
    assert notes  # every change is said
    assert all_typed(fixed)
    assert BAD_SCHEMA["properties"]["mode"] == {
        "enum": ["fast", "slow"],
        "description": "no type",
    }  # untouched


def all_typed(node: Any, path: str = "$") -> bool:
    """Every property schema has a type, or is a bare $ref, or a union whose branches are typed."""
    if not isinstance(node, dict):
        return True
    for name, child in (node.get("properties") or {}).items():
        if not ("type" in child or set(child) == {"$ref"} or "anyOf" in child or "oneOf" in child):
            raise AssertionError(f"{path}.{name} has no type: {child}")
        assert all_typed(child, f"{path}.{name}")
        if "$ref" in child:
            assert set(child) == {"$ref"}, f"{path}.{name}: $ref with siblings"
        if isinstance(child.get("items"), list):
            raise AssertionError(f"{path}.{name}: tuple items")
    return True


@pytest.mark.parametrize(
    ("schema", "why"),
    [
        ({"type": "array"}, "root type"),
        ({"type": "object", "properties": {"x": {"enum": ["a", 1]}}}, "enum mixes"),
        ({"type": "object", "properties": {"x": {"description": "any"}}, "required": ["x"]}, "any value"),
        ({"type": "object", "properties": {"x": {"$ref": "https://example.com/schema.json"}}}, "outside"),
        ({"type": "object", "properties": {"x": {"$ref": "#/$defs/Missing"}}}, "outside"),
        ({"type": "object", "properties": {"x": {"type": "str"}}}, "unknown type"),
        (
            {
                "type": "object",
                "properties": {"x": {"anyOf": [{"type": "string"}, {"description": "?"}]}},
                "required": ["x"],
            },
            "any value",
        ),
        ("not a schema", "not an object"),
    ],
)
def test_an_unfixable_schema_is_refused(schema: Any, why: str) -> None:
    with pytest.raises(SchemaError, match=why):
        sanitize_schema(schema)


def test_a_tool_with_an_unfixable_schema_is_dropped_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    broken = FakeTool("broken_tool", {"type": "object", "properties": {"x": {"enum": ["a", 1]}}})
    fixable = FakeTool("fixable_tool", {"properties": {"q": {"enum": ["a", "b"]}}})
    with caplog.at_level(logging.INFO):
        registry = build_registry([broken, fixable])
    assert registry.names == ("fixable_tool",)
    assert registry.definitions[0]["function"]["parameters"] == {
        "properties": {"q": {"enum": ["a", "b"], "type": "string"}},
        "type": "object",
    }
    dropped = [r for r in caplog.records if "tool dropped" in r.getMessage()]
    assert len(dropped) == 1 and dropped[0].__dict__["tool"] == "broken_tool"
    assert any(r.getMessage() == "tool schema sanitised" for r in caplog.records)


def test_no_parameters_at_all_becomes_an_empty_object_schema() -> None:
    assert sanitize_schema(None)[0] == {"type": "object", "properties": {}}
    assert sanitize_schema({})[0] == {"type": "object", "properties": {}}


@dataclass
class Conditional(FakeTool):
    def usable(self, ctx: ToolContext) -> bool:
        return bool(ctx.action_token)


def test_a_conditional_tool_is_offered_only_when_usable() -> None:
    tools: list[Tool] = [FakeTool("always_here"), Conditional("slack_search")]
    ctx = ToolContext(team_id="T", user="U", channel="C", thread_ts="1.2", slack=None, redis=None)  # type: ignore[arg-type]
    assert [t.name for t in offered(tools, ctx)] == ["always_here"]
    with_token = ToolContext(
        team_id="T",
        user="U",
        channel="C",
        thread_ts="1.2",
        slack=None,
        redis=None,
        action_token="a.b",  # type: ignore[arg-type]
    )
    assert [t.name for t in offered(tools, with_token)] == ["always_here", "slack_search"]


# ---- caps and paging -------------------------------------------------------------------------------


def test_a_long_text_is_paged_like_moonshots_fetch() -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(250))
    first = page_text(text, max_length=100, tool_name="fetch_url")
    assert first.startswith(text[:100])
    assert "Call the fetch_url tool with a start_index of 100 to get more content" in first
    assert "characters 0-100 of 250" in first
    second = page_text(text, start_index=100, max_length=100, tool_name="fetch_url")
    assert second.startswith(text[100:200]) and "start_index of 200" in second
    last = page_text(text, start_index=200, max_length=100, tool_name="fetch_url")
    assert last.startswith(text[200:]) and "start_index of" not in last and "End of content" in last
    past = page_text(text, start_index=400, max_length=100, tool_name="fetch_url")
    assert "No more content" in past
    assert page_text("short", max_length=100, tool_name="x") == "short"
    assert page_text("", max_length=100, tool_name="x") == "(no content)"
    # Reassembled pages give the text back.
    pages, start = [], 0
    while start < len(text):
        pages.append(text[start : start + 100])
        start += 100
    assert "".join(pages) == text


def test_results_are_capped_with_a_note_but_verbatim_ones_are_not() -> None:
    assert cap_result("x" * 50, 100) == "x" * 50
    capped = cap_result("x" * 500, 100)
    assert capped.startswith("x" * 100) and "first 100 of 500 characters" in capped
    result = cap_tool_result(ToolResult(text="y" * 500, title="t", sources=("u",)), 100)
    assert result.text.startswith("y" * 100) and result.title == "t" and result.sources == ("u",)
    secret = ToolResult(text="ENC:" + "ab" * 500, verbatim=True)
    assert cap_tool_result(secret, 100) is secret


def test_definitions_json_is_compact_and_sorted() -> None:
    assert definitions_json([{"b": 1, "a": "é"}]) == '[{"a":"é","b":1}]'
