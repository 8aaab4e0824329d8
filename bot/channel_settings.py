"""Per-channel settings: what a channel's answers use (model, thinking, effort, system prompt addendum,
tools turned off, follow-up mode, budget), resolved channel override > workspace default > env settings.

`ChannelConfig`, `resolve`, `validate` and `overrides_to_save` are pure; `ChannelSettings` is the thin
Redis store. Keys (one hash slot per team, so one MULTI writes a hash and the team's version together):
  kimibot:settings:{T}:channel:<C>   hash of the channel's overrides
  kimibot:settings:{T}:workspace     hash of the workspace defaults
  kimibot:settings:{T}:channels      set of the channels that have overrides (the Home tab lists them)
  kimibot:settings:{T}:version       a new random token on every save: a replica's cached config is stale
                                     when it differs (random, not a counter: a team's data deleted and
                                     saved again never repeats an old value)
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from bot.kimi.profiles import PROFILES, ModelProfile, Thinking, profile_for

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from bot.settings import Settings

FIELDS = ("model", "thinking", "effort", "system_prompt", "tools_off", "followups", "budget_usd")
WORKSPACE_FIELDS = FIELDS[:-1]  # a budget is per channel (the usage part reads it from the channel hash)
EFFORTS = ("low", "high", "max")  # what K3's `reasoning_effort` accepts (shared/docs/KIMI_API.md)
FOLLOWUPS = ("all", "mentions")
# An addendum rides on every request of the channel, so it is kept short. 3,000 characters is what one
# Slack plain_text_input holds (its max_length is at most 3,000), about 1,000 tokens: a page of
# instructions, well under 1% of the smallest window.
SYSTEM_PROMPT_LIMIT = 3_000
BUDGET_LIMIT_USD = Decimal("1000000")


@dataclass(frozen=True)
class ChannelConfig:
    """The settings one question is answered with."""

    model: str
    thinking: bool  # on models that can switch it (Thinking.EXTRA_BODY); always-thinking models ignore it
    effort: str  # K3's reasoning_effort (Thinking.EFFORT); others ignore it
    system_prompt_addendum: str = ""
    tools_off: frozenset[str] = frozenset()
    followups: str = "all"
    budget_usd: Decimal | None = None

    @property
    def profile(self) -> ModelProfile:
        return profile_for(self.model)

    def system_prompt(self, base: str) -> str:
        """The base prompt plus the channel's addendum: the same bytes for every question of the channel
        while its settings stay (the prefix cache), no timestamp or per-question value in it."""
        addendum = self.system_prompt_addendum.strip()
        return f"{base}\n\n{addendum}" if addendum else base


def env_config(settings: Settings) -> ChannelConfig:
    return ChannelConfig(
        model=settings.kimi_model, thinking=True, effort=settings.kimi_reasoning_effort, followups="all"
    )


def _tools(raw: str) -> frozenset[str] | None:
    """A stored `tools_off` (a JSON list of names); None when unreadable, deeply nested lists included (a
    RecursionError here would fail every question of the channel)."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return frozenset(v for v in value if isinstance(v, str)) if isinstance(value, list) else None


CENT = Decimal("0.01")


def parse_budget(raw: str) -> Decimal | None:
    """A budget in USD, 0 or more; None when it is not one. More decimals than cents are rounded to cents,
    so the digits stay bounded whatever the exponent typed (format() of 1e-999999999999 would write a
    trillion zeros); an amount over BUDGET_LIMIT_USD is returned as is, for validate() to refuse."""
    try:
        value = Decimal(raw.strip())
    except (InvalidOperation, ValueError):
        return None
    if not value.is_finite() or value < 0:
        return None
    exponent = value.as_tuple().exponent
    if value <= BUDGET_LIMIT_USD and isinstance(exponent, int) and exponent < -2:
        value = value.quantize(CENT)
    return value


def apply(base: ChannelConfig, layer: Mapping[str, str]) -> ChannelConfig:
    """`base` with the fields `layer` (a stored hash) sets; unreadable values are skipped, not fatal."""
    values: dict[str, Any] = {}
    if layer.get("model", "").strip():
        values["model"] = layer["model"].strip()
    if layer.get("thinking") in ("on", "off"):
        values["thinking"] = layer["thinking"] == "on"
    if layer.get("effort") in EFFORTS:
        values["effort"] = layer["effort"]
    if "system_prompt" in layer:
        values["system_prompt_addendum"] = layer["system_prompt"]
    if "tools_off" in layer and (tools := _tools(layer["tools_off"])) is not None:
        values["tools_off"] = tools
    if layer.get("followups") in FOLLOWUPS:
        values["followups"] = layer["followups"]
    if "budget_usd" in layer:
        budget = parse_budget(layer["budget_usd"]) if layer["budget_usd"].strip() else None
        values["budget_usd"] = budget if budget is None or budget <= BUDGET_LIMIT_USD else None
    return ChannelConfig(**{**base.__dict__, **values})


def resolve(
    settings: Settings, workspace: Mapping[str, str], channel: Mapping[str, str] | None = None
) -> ChannelConfig:
    """Channel override > workspace default > env settings. A budget is never inherited from the
    workspace hash (it is the channel's own)."""
    config = apply(env_config(settings), {k: v for k, v in workspace.items() if k != "budget_usd"})
    return apply(config, channel or {})


def to_fields(config: ChannelConfig) -> dict[str, str]:
    """The hash fields that describe `config` (the form the modal and the store compare)."""
    return {
        "model": config.model,
        "thinking": "on" if config.thinking else "off",
        "effort": config.effort,
        "system_prompt": config.system_prompt_addendum,
        "tools_off": json.dumps(sorted(config.tools_off)),
        "followups": config.followups,
        "budget_usd": "" if config.budget_usd is None else str(config.budget_usd),
    }


PINNED = ("model", "thinking", "effort", "tools_off")  # what a job keeps of its settings for a re-run


def pin(config: ChannelConfig) -> str:
    """What a job notes of its channel's settings on its first run (its progress), for a re-run."""
    fields = to_fields(config)
    return json.dumps({name: fields[name] for name in PINNED}, sort_keys=True)


def pinned(config: ChannelConfig, raw: str) -> ChannelConfig:
    """`config` with the model, thinking, effort and tools a job's first run used: a re-run resumes its
    checkpointed steps, whose replay must go to the same model the same way (a model switched mid-job gets
    steps without the reasoning it needs: a 400; a tool turned off has calls in them). Unreadable:
    `config` as it is."""
    try:
        layer = json.loads(raw)
    except (ValueError, RecursionError):
        return config
    if not isinstance(layer, dict):
        return config
    return apply(config, {k: v for k, v in layer.items() if k in PINNED and isinstance(v, str)})


def overrides_to_save(inherited: ChannelConfig, submitted: Mapping[str, str]) -> dict[str, str | None]:
    """What to write: a field equal to the inherited value is removed (None), so the channel keeps
    following the workspace default for it; a differing one is set."""
    base = to_fields(inherited)
    out: dict[str, str | None] = {}
    for name, value in submitted.items():
        if name == "budget_usd":
            out[name] = value or None  # the channel's own: kept whenever set
        else:
            out[name] = None if value == base.get(name) else value
    return out


@dataclass(frozen=True)
class Submitted:
    """A settings form, read: field values (hash form) and the errors to show, keyed by field name."""

    values: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def validate(
    raw: Mapping[str, str | list[str] | None],
    *,
    offered_tools: list[str],
    previous_off: frozenset[str] = frozenset(),
    models: list[str] | None = None,
    workspace: bool = False,
) -> Submitted:
    """Check a submitted form. `raw`: model, thinking ("on"/"off"/None), effort, system_prompt,
    tools_on (the checked tool names), followups, budget_usd. `offered_tools` were the form's checkboxes;
    a tool the form did not list keeps its state (`previous_off`). `models`: the form's model options."""
    errors: dict[str, str] = {}
    values: dict[str, str] = {}
    model = str(raw.get("model") or "").strip()
    if model not in (models if models is not None else list(PROFILES)):
        errors["model"] = "Pick one of the listed models."
    profile = profile_for(model)
    values["model"] = model
    thinking = str(raw.get("thinking") or "on")
    if thinking not in ("on", "off"):
        errors["thinking"] = "Thinking is on or off."
    elif thinking == "off" and profile.thinking in (Thinking.ALWAYS, Thinking.EFFORT):
        errors["thinking"] = f"{model} always thinks: thinking cannot be switched off."
    values["thinking"] = thinking
    effort = str(raw.get("effort") or "")
    if effort and effort not in EFFORTS:
        errors["effort"] = f"Reasoning effort is one of {', '.join(EFFORTS)}."
    elif effort and profile.thinking is not Thinking.EFFORT:
        errors["effort"] = f"{model} takes no reasoning effort: leave it empty (K3 models only)."
    if effort:
        values["effort"] = effort
    prompt = str(raw.get("system_prompt") or "")
    if len(prompt) > SYSTEM_PROMPT_LIMIT:
        errors["system_prompt"] = (
            f"Keep the addendum under {SYSTEM_PROMPT_LIMIT:,} characters (it is {len(prompt):,}): it is sent "
            "with every question of the channel."
        )
    values["system_prompt"] = prompt.strip()
    checked = raw.get("tools_on") or []
    on = set(checked if isinstance(checked, list) else [checked])
    off = {t for t in offered_tools if t not in on} | {t for t in previous_off if t not in offered_tools}
    values["tools_off"] = json.dumps(sorted(off))
    followups = str(raw.get("followups") or "all")
    if followups not in FOLLOWUPS:
        errors["followups"] = "Pick when I answer thread replies."
    values["followups"] = followups
    if not workspace:
        budget = str(raw.get("budget_usd") or "").strip()
        if budget:
            value = parse_budget(budget)
            if value is None:
                errors["budget_usd"] = "A budget is a number of US dollars, 0 or more (empty: no budget)."
            elif value > BUDGET_LIMIT_USD:
                errors["budget_usd"] = "That budget is over a million dollars a month: is it a typo?"
            else:
                budget = format(value, "f")  # plain digits, never 1E+2, for the usage part to read
        values["budget_usd"] = budget
    return Submitted(values, errors)


# The Home tab's sections hold 3,000 characters: a long list of tools off must not fill one.
NAMES_SHOWN_CHARS = 600


def name_list(names: frozenset[str] | set[str], limit: int = NAMES_SHOWN_CHARS) -> str:
    """Names sorted and comma-separated, cut to about `limit` characters: "a, b and 12 more"."""
    ordered = sorted(names)
    shown: list[str] = []
    used = 0
    for name in ordered:
        used += len(name) + 2
        if used > limit:
            break
        shown.append(name)
    rest = len(ordered) - len(shown)
    if not rest:
        return ", ".join(shown)
    return f"{', '.join(shown)} and {rest} more" if shown else f"{rest} tools"


def differences(inherited: ChannelConfig, channel: ChannelConfig) -> list[str]:
    """What a channel's config changes against the workspace's, one short phrase each (Home tab)."""
    out = []
    if channel.model != inherited.model:
        out.append(f"model {channel.model}")
    if channel.thinking != inherited.thinking:
        out.append(f"thinking {'on' if channel.thinking else 'off'}")
    if channel.effort != inherited.effort:
        out.append(f"effort {channel.effort}")
    if channel.system_prompt_addendum != inherited.system_prompt_addendum:
        out.append("own system prompt addendum")
    if channel.tools_off != inherited.tools_off:
        out.append("tools off: " + (name_list(channel.tools_off) or "none"))
    if channel.followups != inherited.followups:
        out.append(f"follow-ups: {channel.followups}")
    if channel.budget_usd is not None:
        out.append(f"budget ${channel.budget_usd}/month")
    return out


# KEYS: the channel index, then n channel hashes. ARGV: the n channel ids, then the setting fields. A channel
# whose hash sets none of them leaves the index (one script: a concurrent save's MULTI is before or after).
_PRUNE = """
local n = #KEYS - 1
for i = 1, n do
  local set = false
  for j = n + 1, #ARGV do
    if redis.call('HEXISTS', KEYS[i + 1], ARGV[j]) == 1 then set = true break end
  end
  if not set then redis.call('SREM', KEYS[1], ARGV[i]) end
end
return n
"""


class SettingsKeys:
    """The settings part's Redis keys for one team (all in the team's hash slot)."""

    def __init__(self, team_id: str) -> None:
        prefix = f"kimibot:settings:{{{team_id}}}"
        self.workspace = f"{prefix}:workspace"
        self.channels = f"{prefix}:channels"
        self.version = f"{prefix}:version"
        self._prefix = prefix

    def channel(self, channel_id: str) -> str:
        return f"{self._prefix}:channel:{channel_id}"


class ChannelSettings:
    """The Redis store, with a per-process cache checked against the team's version key on every read
    (one GET): a save on any replica is seen by the next question everywhere."""

    def __init__(self, redis: Redis, settings: Settings, *, cache_size: int = 10_000) -> None:
        self.redis = redis
        self.settings = settings
        self.cache_size = cache_size
        self._cache: dict[tuple[str, str], tuple[str, ChannelConfig]] = {}

    async def layers(self, team_id: str, channel: str | None) -> tuple[dict[str, str], dict[str, str]]:
        keys = SettingsKeys(team_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.workspace)
            pipe.hgetall(keys.channel(channel) if channel else keys.workspace)
            workspace, own = await pipe.execute()
        return _decode(workspace), _decode(own) if channel else {}

    async def resolve(self, team_id: str, channel: str) -> ChannelConfig:
        """The config the next question in `channel` is answered with."""
        version = await self.redis.get(SettingsKeys(team_id).version)
        stamp = _text(version) if version is not None else ""
        cached = self._cache.get((team_id, channel))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        workspace, own = await self.layers(team_id, channel)
        config = resolve(self.settings, workspace, own)
        if len(self._cache) >= self.cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[(team_id, channel)] = (stamp, config)
        return config

    async def followups(self, team_id: str, channel: str) -> str:
        return (await self.resolve(team_id, channel)).followups

    async def workspace(self, team_id: str) -> ChannelConfig:
        workspace, _ = await self.layers(team_id, None)
        return resolve(self.settings, workspace)

    async def overridden(self, team_id: str, limit: int = 40) -> tuple[dict[str, dict[str, str]], int]:
        """The first `limit` channels (by id) with overrides and their stored fields, read in one round
        trip, and how many more channels the index lists (the Home tab). A listed channel whose hash no
        longer sets anything (every field back to the default) leaves the index."""
        keys = SettingsKeys(team_id)
        channels = sorted(_text(c) for c in await self.redis.smembers(keys.channels))  # type: ignore[misc]
        shown = channels[: max(limit, 0)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for channel in shown:
                pipe.hgetall(keys.channel(channel))
            hashes = await pipe.execute() if shown else []
        out: dict[str, dict[str, str]] = {}
        empty: list[str] = []
        for channel, raw in zip(shown, hashes, strict=True):
            stored = {k: v for k, v in _decode(raw).items() if k in FIELDS}
            if stored:
                out[channel] = stored
            else:
                empty.append(channel)
        if empty:  # checked again in the script: a save since this read keeps its channel listed
            await self.redis.eval(  # type: ignore[misc]
                _PRUNE, 1 + len(empty), keys.channels, *map(keys.channel, empty), *empty, *FIELDS
            )
        return out, len(channels) - len(shown)

    async def save(
        self, team_id: str, channel: str | None, changes: Mapping[str, str | None], user: str
    ) -> None:
        """Write a channel's overrides (or, with channel None, the workspace defaults): None removes a
        field. The hash, the channel index and the version move together (one MULTI, one slot)."""
        keys = SettingsKeys(team_id)
        key = keys.channel(channel) if channel else keys.workspace
        to_set: dict[Any, Any] = {k: v for k, v in changes.items() if v is not None}
        to_drop = [k for k, v in changes.items() if v is None]
        async with self.redis.pipeline(transaction=True) as pipe:
            if to_drop:
                pipe.hdel(key, *to_drop)
            to_set.update({"updated_by": user, "updated_at": f"{time.time():.0f}"})
            pipe.hset(key, mapping=to_set)
            if channel:
                pipe.sadd(keys.channels, channel)
            pipe.set(keys.version, uuid.uuid4().hex)
            await pipe.execute()
        self._cache.pop((team_id, channel or ""), None)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}
