"""One row per Kimi model: window, output budget, how thinking is switched on, what may be sent, and its
list prices.

A model quirk is a field here, never an `if model == ...` elsewhere. Sources: shared/docs/KIMI_API.md
(section 6 "Pricing" for the prices: Moonshot's list prices in USD per 1M tokens, before tax).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any


class Thinking(StrEnum):
    """How a model is made to think."""

    EXTRA_BODY = "extra_body"  # send {"thinking": {"type": "enabled"}} (kimi-k2.5 / k2.6)
    ALWAYS = "always"  # thinks by model id; send nothing (kimi-k2-thinking, k2.7-code)
    EFFORT = "effort"  # always thinks; top-level reasoning_effort low|high|max (kimi-k3*)
    NONE = "none"  # unknown model: send nothing special


@dataclass(frozen=True)
class ModelProfile:
    """What kimibot must know about one model id to call it correctly."""

    model_id: str
    context_window: int
    output_budget: int  # max_completion_tokens we send; reasoning and answer share it
    thinking: Thinking
    fixed_sampling: dict[str, Any] = field(default_factory=dict)  # sampling params to send as-is
    # USD per million tokens: input miss, input cache hit, output
    price_in: float = 0.0
    price_cached: float = 0.0
    price_out: float = 0.0
    known: bool = True
    # Trained with preserved thinking: earlier answers go back with their reasoning (kimi-k2.7-code, k3).
    # Others ignore earlier turns' reasoning, so the history keeps it out (KIMI_API.md section 3).
    replays_reasoning: bool = False
    # A quick side request (a long thread's summary) goes with thinking off where the model allows it
    # (Thinking.EXTRA_BODY) and with this reasoning_effort where effort is what it takes (Thinking.EFFORT):
    # the lowest it accepts (KIMI_API.md section 9).
    quick_effort: str = "low"
    # Reads images (`image_url` content parts). From this table, and from GET /models' `supports_image_in`
    # where the host lists it (`learn_models`). Text-only models get a sentence instead of the image.
    supports_image_in: bool = False

    def request_params(
        self, reasoning_effort: str, max_completion_tokens: int = 0, *, thinking: bool = True
    ) -> dict[str, Any]:
        """The model-specific keyword arguments for chat.completions.create. `thinking` False switches it
        off where the model allows that (Thinking.EXTRA_BODY); always-thinking models ignore it."""
        params: dict[str, Any] = {"max_completion_tokens": max_completion_tokens or self.output_budget}
        params.update(self.fixed_sampling)
        if self.thinking is Thinking.EXTRA_BODY:
            params["extra_body"] = {"thinking": {"type": "enabled" if thinking else "disabled"}}
        elif self.thinking is Thinking.EFFORT:
            params["reasoning_effort"] = reasoning_effort
        return params

    def thinks(self, thinking: bool = True) -> bool:
        """Whether a request with this `thinking` switch reasons before it answers: only a model that can
        switch thinking (Thinking.EXTRA_BODY) follows the switch; an unknown model is taken not to think."""
        if self.thinking is Thinking.EXTRA_BODY:
            return thinking
        return self.thinking is not Thinking.NONE

    def cost_nusd(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
        """Cost in nano-USD (1e-9 USD), an integer: budgets add and compare these exactly in Redis.
        `prompt_tokens` counts all input, cached included (Kimi's usage, like OpenAI's); the cached part is
        priced at the cache-hit price, the rest at the miss price; reasoning is billed as output."""
        prompt = max(prompt_tokens, 0)
        cached = min(max(cached_tokens, 0), prompt)  # a report with more cached than prompt: not billed twice
        micro = (
            (prompt - cached) * self.price_in
            + cached * self.price_cached
            + max(completion_tokens, 0) * self.price_out
        )  # USD per 1M tokens x tokens = micro-USD
        return math.ceil(round(micro * 1000, 3))

    def cost_usd(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        return self.cost_nusd(prompt_tokens, cached_tokens, completion_tokens) / 1e9

    def with_prices(self, prices: tuple[float, float, float] | None) -> ModelProfile:
        """This profile with other prices (KIMI_PRICES), or itself."""
        if prices is None:
            return self
        return replace(self, price_in=prices[0], price_cached=prices[1], price_out=prices[2])


K2_WINDOW = 262_144
K3_WINDOW = 1_048_576

# Exact ids first; PREFIX_PROFILES catch later releases of a family (kimi-k3.2-..., kimi-k2.7-code-...).
PROFILES: dict[str, ModelProfile] = {
    p.model_id: p
    for p in (
        ModelProfile(
            "kimi-k2.6", K2_WINDOW, 32_768, Thinking.EXTRA_BODY, {}, 0.95, 0.16, 4.00, supports_image_in=True
        ),
        ModelProfile(
            "kimi-k2.5", K2_WINDOW, 32_768, Thinking.EXTRA_BODY, {}, 0.60, 0.10, 3.00, supports_image_in=True
        ),
        ModelProfile(
            "kimi-k2.7-code", K2_WINDOW, 32_768, Thinking.ALWAYS, {}, 0.95, 0.19, 4.00, replays_reasoning=True
        ),
        ModelProfile(
            "kimi-k2.7-code-highspeed",
            K2_WINDOW,
            32_768,
            Thinking.ALWAYS,
            {},
            1.90,
            0.38,
            8.00,
            replays_reasoning=True,
        ),
        ModelProfile(
            "kimi-k2-thinking", K2_WINDOW, 32_768, Thinking.ALWAYS, {"temperature": 1.0}, 0.60, 0.15, 2.50
        ),
        ModelProfile(
            "kimi-k2-thinking-turbo",
            K2_WINDOW,
            32_768,
            Thinking.ALWAYS,
            {"temperature": 1.0},
            1.15,
            0.15,
            8.00,
        ),
        ModelProfile(
            "kimi-k3", K3_WINDOW, 65_536, Thinking.EFFORT, {}, 3.00, 0.30, 15.00, replays_reasoning=True
        ),
        ModelProfile(
            "kimi-k3.1-pro", K3_WINDOW, 65_536, Thinking.EFFORT, {}, 2.00, 0.20, 10.00, replays_reasoning=True
        ),
        ModelProfile(
            "kimi-k3.1-pro-highspeed",
            K3_WINDOW,
            65_536,
            Thinking.EFFORT,
            {},
            4.00,
            0.20,
            20.00,
            replays_reasoning=True,
        ),
    )
}

PREFIX_PROFILES: tuple[tuple[str, ModelProfile], ...] = (
    ("kimi-k2-thinking", PROFILES["kimi-k2-thinking"]),
    ("kimi-k2.7-code", PROFILES["kimi-k2.7-code"]),
    ("kimi-k2.6", PROFILES["kimi-k2.6"]),
    ("kimi-k2.5", PROFILES["kimi-k2.5"]),
    ("kimi-k3", PROFILES["kimi-k3"]),
)

# An id we do not know: a modest window and budget, and no parameter that could earn a 400. Priced at the
# highest known list price of each kind, so that budgets hold for it too (KIMI_PRICES can name its prices).
CONSERVATIVE = ModelProfile(
    "unknown",
    128_000,
    16_384,
    Thinking.NONE,
    {},
    max(p.price_in for p in PROFILES.values()),
    max(p.price_cached for p in PROFILES.values()),
    max(p.price_out for p in PROFILES.values()),
    known=False,
)


def _normalise(model_id: str) -> str:
    """Third-party hosts prefix the vendor ("moonshotai/kimi-k2-thinking"); we key on the bare id."""
    return model_id.strip().lower().rsplit("/", 1)[-1]


Prices = dict[str, tuple[float, float, float]]


def parse_prices(text: str) -> Prices:
    """KIMI_PRICES: JSON `{"model id": [miss, hit, output], ...}` in USD per 1M tokens (empty: none).
    Raises ValueError with a sentence saying what is wrong."""
    if not text.strip():
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"is not JSON ({exc.msg})") from exc
    if not isinstance(raw, dict):
        raise ValueError('is not a JSON object {"model": [miss, hit, output]}')
    prices: Prices = {}
    for model, row in raw.items():
        if (
            not isinstance(row, list)
            or len(row) != 3
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in row)
            or any(not math.isfinite(v) or v < 0 for v in row)
        ):
            raise ValueError(f"gives {model!r} {row!r}, not three prices >= 0 [miss, hit, output]")
        prices[_normalise(str(model))] = (float(row[0]), float(row[1]), float(row[2]))
    return prices


# What the Kimi host said about its models' image input (GET /models `supports_image_in`), by bare id:
# learned once at start-up (bot/startup.py check_kimi), a fact about the host for the process's life.
LISTED_IMAGE_IN: dict[str, bool] = {}


def learn_models(listed: Any) -> dict[str, bool]:
    """Take `supports_image_in` from GET /models' `data` list where the host gives it (a boolean); models
    it does not describe keep the table's value. Returns what was learned."""
    learned = {
        _normalise(str(m["id"])): m["supports_image_in"]
        for m in (listed if isinstance(listed, list) else [])
        if isinstance(m, dict) and m.get("id") and isinstance(m.get("supports_image_in"), bool)
    }
    LISTED_IMAGE_IN.update(learned)
    return learned


def profile_for(model_id: str, prices: Prices | None = None) -> ModelProfile:
    """The profile for a model id; unknown ids get CONSERVATIVE with `known=False` (callers warn).
    `prices` (parsed KIMI_PRICES) override the table's prices for the ids they name; image input is as
    GET /models said where it did (`learn_models`)."""
    bare = _normalise(model_id)
    profile = _table_profile(bare).with_prices((prices or {}).get(bare))
    listed = LISTED_IMAGE_IN.get(bare)
    if listed is not None and listed != profile.supports_image_in:
        profile = replace(profile, supports_image_in=listed)
    return profile


def _table_profile(bare: str) -> ModelProfile:
    if bare in PROFILES:
        return PROFILES[bare]
    for prefix, profile in PREFIX_PROFILES:
        if bare.startswith(prefix):
            return profile
    return CONSERVATIVE
