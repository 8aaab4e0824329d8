"""The tool registry: which tools are offered, in which order, with which definitions (all pure).

- Names must match Moonshot's `^[a-zA-Z_][a-zA-Z0-9_-]{2,63}$`; duplicates and tools past 127 are dropped
  (the agent loop adds `read_more`: 128 in all).
- Definitions are byte-stable for the prefix cache: tools sorted by name, every dict rebuilt with its keys
  in sorted order, so the same tools give a byte-identical list however they were registered and whichever
  JSON encoder (key order preserved) sends them.
- Schemas are sanitised to the JSON Schema subset Moonshot accepts: `definitions` become `$defs`, a `$ref`
  loses its siblings, tuple `items` become one schema, a property without `type` gets one inferred (from
  `enum`, `const`, `properties`, `items`, a nullable `anyOf`...), or is dropped when optional; a schema
  that cannot be fixed drops its tool with a log line: one bad schema would fail every request.
- Results are capped and paged: `page_text` cuts a long text the way Moonshot's `fetch` formula does
  (`start_index` + `max_length`, and a note naming the `start_index` that continues), `cap_result` is the
  loop's last line of defence for tools that do not page themselves.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bot.tools.base import Tool, ToolContext, ToolResult

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_-]{2,63}$")
MAX_TOOLS = 128
JSON_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
# Schema keys whose value is a map of name -> schema, or one schema, or a list of schemas.
_SCHEMA_MAPS = ("properties", "$defs", "patternProperties")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "contains", "propertyNames")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf")
_DROP_KEYS = ("$schema", "$id", "$comment")


class SchemaError(ValueError):
    """The schema cannot be brought into the accepted subset."""


# ---- schemas -------------------------------------------------------------------------------------


def canonical(value: Any) -> Any:
    """A deep copy with every dict's keys in sorted order: insertion-ordered encoders then agree."""
    if isinstance(value, Mapping):
        return {str(k): canonical(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return value


def sanitize_schema(schema: Any) -> tuple[dict[str, Any], list[str]]:
    """The parameters schema in Moonshot's subset, and a note per change; SchemaError when unfixable."""
    notes: list[str] = []
    if schema is None:
        schema = {}
    if not isinstance(schema, Mapping):
        raise SchemaError("parameters is not an object")
    root: dict[str, Any] = copy.deepcopy(dict(schema))
    for key in _DROP_KEYS:
        root.pop(key, None)
    if "definitions" in root:
        defs = root.pop("definitions")
        if not isinstance(defs, Mapping):
            raise SchemaError("definitions is not an object")
        root["$defs"] = {**defs, **(root.get("$defs") or {})}
        _rewrite_refs(root)
        notes.append("definitions renamed to $defs")
    if "type" not in root:
        root["type"] = "object"
        notes.append("root type set to object")
    if root["type"] != "object":
        raise SchemaError(f"the root type is {root['type']!r}, not object")
    root.setdefault("properties", {})
    defs = root.get("$defs") or {}
    fixed = _fix_node(root, "$", defs, notes, is_root=True)
    for ref_target in _refs(fixed):
        if not ref_target.startswith("#/$defs/") or ref_target.removeprefix("#/$defs/") not in (
            fixed.get("$defs") or {}
        ):
            raise SchemaError(f"$ref {ref_target!r} points outside this schema's $defs")
    return fixed, notes


def _rewrite_refs(node: Any) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/definitions/"):
            node["$ref"] = "#/$defs/" + ref.removeprefix("#/definitions/")
        for value in node.values():
            _rewrite_refs(value)
    elif isinstance(node, list):
        for value in node:
            _rewrite_refs(value)


def _refs(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _type_of_values(values: Sequence[Any]) -> str | None:
    kinds = set()
    for value in values:
        if isinstance(value, bool):
            kinds.add("boolean")
        elif isinstance(value, int):
            kinds.add("integer")
        elif isinstance(value, float):
            kinds.add("number")
        elif isinstance(value, str):
            kinds.add("string")
        elif value is None:
            kinds.add("null")
        else:
            return None
    if len(kinds) > 1:
        kinds.discard("null")
    if kinds == {"integer", "number"}:
        return "number"
    return kinds.pop() if len(kinds) == 1 else None


def _fix_node(
    node: Any, path: str, defs: Mapping[str, Any], notes: list[str], *, is_root: bool = False
) -> Any:
    """One schema node, fixed in place where possible; returns the node (which may be a new one)."""
    if not isinstance(node, dict):
        raise SchemaError(f"{path} is not a schema object")
    for key in _DROP_KEYS:
        node.pop(key, None)
    if "$ref" in node:
        if len(node) > 1:
            notes.append(
                f"{path}: siblings of $ref dropped ({', '.join(sorted(k for k in node if k != '$ref'))})"
            )
            return {"$ref": node["$ref"]}
        return node
    # Tuple items (`items: [...]` or `prefixItems`) become one schema when they agree, else anyOf.
    tuple_items = node.pop("prefixItems", None)
    if isinstance(node.get("items"), list):
        tuple_items = node.pop("items")
    if tuple_items is not None:
        distinct: list[Any] = []
        for item in tuple_items:
            if item not in distinct:
                distinct.append(item)
        node["items"] = distinct[0] if len(distinct) == 1 else ({"anyOf": distinct} if distinct else {})
        node.setdefault("type", "array")
        notes.append(f"{path}: tuple items made one items schema")
    # Nested schemas first, so unions can look at their branches' types.
    for key in _SCHEMA_MAPS:
        children = node.get(key)
        if isinstance(children, dict):
            for name in list(children):
                try:
                    children[name] = _fix_node(children[name], f"{path}.{key}.{name}", defs, notes)
                except _DropProperty:
                    required = node.get("required") or []
                    if key != "properties" or name in required:
                        raise SchemaError(
                            f"{path}.{key}.{name} accepts any value (no type can be given)"
                        ) from None
                    del children[name]
                    notes.append(f"{path}.{key}.{name}: dropped (any value, no type)")
    for key in _SCHEMA_ONE:
        child = node.get(key)
        if isinstance(child, dict) and child:
            try:
                node[key] = _fix_node(child, f"{path}.{key}", defs, notes)
            except _DropProperty:
                del node[key]
        elif key == "items" and child == {}:
            del node[key]
    for key in _SCHEMA_LISTS:
        branches = node.get(key)
        if isinstance(branches, list):
            node[key] = [_fix_node(b, f"{path}.{key}[{i}]", defs, notes) for i, b in enumerate(branches)]
    if isinstance(node.get("required"), list) and isinstance(node.get("properties"), dict):
        known = [name for name in node["required"] if name in node["properties"]]
        if known != node["required"]:
            notes.append(f"{path}: required names without a property dropped")
            node["required"] = known
    return _fix_type(node, path, notes, is_root=is_root)


class _DropProperty(Exception):
    """This node accepts any value: as an optional property it is dropped, elsewhere it is fatal."""


def _fix_type(node: dict[str, Any], path: str, notes: list[str], *, is_root: bool) -> dict[str, Any]:
    kind = node.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"] or ["null"]
        if len(kinds) == 1:
            node["type"] = kinds[0]
            notes.append(f"{path}: type list {kind} made {kinds[0]!r}")
        else:
            del node["type"]
            node["anyOf"] = [{"type": k} for k in kinds]
            notes.append(f"{path}: type list {kind} made anyOf")
            return _fix_type(node, path, notes, is_root=is_root)
        kind = node["type"]
    if kind is not None:
        if kind not in JSON_TYPES:
            raise SchemaError(f"{path}: unknown type {kind!r}")
        return node
    # No type: infer one.
    for union in ("anyOf", "oneOf"):
        branches = node.get(union)
        if isinstance(branches, list):
            real = [b for b in branches if b.get("type") != "null"] or branches[:1]
            if len(real) == 1:
                merged = {**{k: v for k, v in node.items() if k != union}, **real[0]}
                notes.append(f"{path}: single-branch {union} merged")
                return _fix_type(merged, path, notes, is_root=is_root)
            if real and all("type" in b or "$ref" in b for b in real):
                if len(real) < len(branches):
                    node[union] = real
                return node  # every branch says its type
            raise SchemaError(f"{path}: a branch of {union} has no type")
    if isinstance(node.get("allOf"), list):
        branches = node["allOf"]
        if len(branches) == 1:
            merged = {**{k: v for k, v in node.items() if k != "allOf"}, **branches[0]}
            notes.append(f"{path}: single-branch allOf merged")
            return _fix_type(merged, path, notes, is_root=is_root)
        if all("type" in b or "$ref" in b for b in branches):
            return node
        raise SchemaError(f"{path}: a branch of allOf has no type")
    inferred: str | None = None
    if "enum" in node and isinstance(node["enum"], list) and node["enum"]:
        inferred = _type_of_values(node["enum"])
        if inferred is None:
            raise SchemaError(f"{path}: enum mixes value types")
    elif "const" in node:
        inferred = _type_of_values([node["const"]])
    elif any(k in node for k in ("properties", "required", "additionalProperties", "patternProperties")):
        inferred = "object"
    elif any(k in node for k in ("items", "minItems", "maxItems", "uniqueItems")):
        inferred = "array"
    elif any(k in node for k in ("minLength", "maxLength", "pattern", "format")):
        inferred = "string"
    elif any(k in node for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")):
        inferred = "number"
    if inferred is None:
        if is_root:
            raise SchemaError(f"{path}: no type")
        raise _DropProperty(path)
    node["type"] = inferred
    notes.append(f"{path}: type {inferred!r} inferred")
    return node


# ---- definitions and the registry ----------------------------------------------------------------


def tool_definition(tool: Tool) -> dict[str, Any]:
    """The OpenAI/Moonshot `{"type": "function", "function": {...}}` entry (canonical key order);
    SchemaError when the tool cannot be offered."""
    if not isinstance(tool.name, str) or not NAME_RE.match(tool.name):
        raise SchemaError(f"name {tool.name!r} does not match {NAME_RE.pattern}")
    parameters, notes = sanitize_schema(tool.parameters)
    if notes:
        log.info("tool schema sanitised", extra={"tool": tool.name, "changes": notes})
    definition: dict[str, Any] = canonical(
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": str(tool.description or "").strip(),
                "parameters": parameters,
            },
        }
    )
    return definition


@dataclass(frozen=True)
class Registry:
    """The tools of one offer: definitions in a fixed order, and the tool behind each name."""

    tools: tuple[Tool, ...]
    definitions: tuple[dict[str, Any], ...]

    def get(self, name: str) -> Tool | None:
        for tool in self.tools:
            if tool.name == name:
                return tool
        return None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(tool.name for tool in self.tools)

    def definitions_list(self) -> list[dict[str, Any]]:
        """A fresh copy for a request's `tools` (the loop may hand it to a client that mutates)."""
        return copy.deepcopy(list(self.definitions))

    def definitions_json(self) -> str:
        return definitions_json(self.definitions)


def definitions_json(definitions: Iterable[Mapping[str, Any]]) -> str:
    """The byte-stable form: what tests compare, and what a raw-HTTP client would send."""
    return json.dumps(list(definitions), ensure_ascii=False, separators=(",", ":"), sort_keys=True)


# The registries of the last few tool lists offered (see registry_for), most recently used last.
_REGISTRIES: OrderedDict[tuple[int, ...], tuple[tuple[Any, ...], Registry]] = OrderedDict()
REGISTRIES_KEPT = 16  # different tool lists at once: channels' tools_off choices, an MCP server coming back


def registry_for(tools: Iterable[Tool]) -> Registry:
    """`build_registry`, remembered: the same tools (the same objects, each with the same name, description
    and parameters object) get the registry built for them before, so a turn's offer does not sanitise every
    schema again (~0.3 ms for the built-ins). Tools are never changed in place (an MCP server's new list,
    the web_search definition loaded at start: new objects), so the objects say when it must be rebuilt;
    the entry holds them, so their ids are not reused while it is kept."""
    given = tuple(tools)
    shape = tuple(x for tool in given for x in (tool, tool.name, tool.description, tool.parameters))
    key = tuple(id(x) for x in shape)
    kept = _REGISTRIES.get(key)
    if kept is not None and all(a is b for a, b in zip(kept[0], shape, strict=True)):
        _REGISTRIES.move_to_end(key)
        return kept[1]
    registry = build_registry(given)
    _REGISTRIES[key] = (shape, registry)
    while len(_REGISTRIES) > REGISTRIES_KEPT:
        _REGISTRIES.popitem(last=False)
    return registry


def build_registry(tools: Iterable[Tool]) -> Registry:
    """Offerable tools: valid names, sanitisable schemas, no duplicates (the first wins), at most 127
    (the first ones given win, so list built-ins first), sorted by name. Each drop is logged."""
    accepted: list[tuple[Tool, dict[str, Any]]] = []
    seen: set[str] = set()
    for tool in tools:
        name = getattr(tool, "name", "?")
        if name in seen:
            log.warning("tool dropped: duplicate name", extra={"tool": name})
            continue
        try:
            definition = tool_definition(tool)
        except SchemaError as exc:
            log.warning("tool dropped: %s", exc, extra={"tool": name})
            continue
        if len(accepted) >= MAX_TOOLS - 1:  # the loop adds read_more: 128 in all, web_search kept
            log.warning("tool dropped: more than %d tools", MAX_TOOLS - 1, extra={"tool": name})
            continue
        seen.add(name)
        accepted.append((tool, definition))
    accepted.sort(key=lambda pair: pair[0].name)
    return Registry(tools=tuple(t for t, _ in accepted), definitions=tuple(d for _, d in accepted))


def offered(tools: Iterable[Tool], ctx: ToolContext) -> list[Tool]:
    """The tools usable for this turn: a tool may have `usable(ctx) -> bool` (see base.ConditionalTool),
    e.g. `slack_search` only when the event carried an `action_token`."""
    result = []
    for tool in tools:
        usable = getattr(tool, "usable", None)
        if usable is None or usable(ctx):
            result.append(tool)
    return result


# ---- result caps and paging ----------------------------------------------------------------------


def page_text(text: str, *, start_index: int = 0, max_length: int, tool_name: str) -> str:
    """One page of `text` the way Moonshot's `fetch` formula pages: from `start_index`, at most
    `max_length` characters, and when more is left a note naming the `start_index` that continues."""
    total = len(text)
    start_index = max(0, start_index)
    max_length = max(1, max_length)
    if total == 0:
        return "(no content)"
    if start_index >= total:
        return (
            f"[No more content: the text has {total} characters; start_index {start_index} is past its end.]"
        )
    end = min(total, start_index + max_length)
    page = text[start_index:end]
    if end < total:
        page += (
            f"\n\n[Content truncated: characters {start_index}-{end} of {total} shown. Call the {tool_name} "
            f"tool with a start_index of {end} to get more content.]"
        )
    elif start_index:
        page += f"\n\n[End of content: characters {start_index}-{end} of {total}.]"
    return page


def cap_result(text: str, max_chars: int) -> str:
    """A result no longer than about `max_chars`: cut, with a note saying how much was left out."""
    if len(text) <= max_chars:
        return text
    note = f"\n\n[Result truncated: the first {max_chars} of {len(text)} characters are shown.]"
    return text[:max_chars] + note


def cap_tool_result(result: ToolResult, max_chars: int) -> ToolResult:
    """`cap_result` on a tool's result, except a `verbatim` one (web_search's encrypted output)."""
    if result.verbatim or len(result.text) <= max_chars:
        return result
    return ToolResult(
        text=cap_result(result.text, max_chars),
        ok=result.ok,
        title=result.title,
        sources=result.sources,
        verbatim=False,
    )
