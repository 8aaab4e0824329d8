"""`.env.example` and the README's settings table stay in step with the Settings class.

The names are read from `Settings.model_fields` each run, so a new setting that is not documented in both
places fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

from bot.settings import SECRET_SETTINGS, Settings

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^#? ?([A-Z][A-Z0-9_]*)=(.*)$")


def env_example() -> dict[str, tuple[str, bool]]:
    """NAME -> (value, commented out) for every `NAME=value` or `# NAME=value` line."""
    found: dict[str, tuple[str, bool]] = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = LINE.match(line)
        if match:
            found[match.group(1)] = (match.group(2), line.startswith("#"))
    return found


def readme_settings() -> list[str]:
    """The names in the first column of the README's "Settings" table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Settings", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", section, flags=re.MULTILINE)


def fields() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


def test_every_setting_is_in_env_example() -> None:
    missing = fields() - set(env_example())
    assert not missing, f".env.example lacks {sorted(missing)}"


def test_env_example_names_only_real_settings() -> None:
    allowed = fields() | {f"{name}_FILE" for name in SECRET_SETTINGS}
    assert set(env_example()) <= allowed, set(env_example()) - allowed


def test_env_example_shows_the_real_defaults() -> None:
    for name, (value, commented) in env_example().items():
        field = Settings.model_fields.get(name.lower())
        if field is None or not commented or len(str(field.default)) > 100:
            continue  # a _FILE example, a value to fill in, or SYSTEM_PROMPT's long default
        assert value == str(field.default), (name, value, field.default)


def test_every_setting_is_in_the_readme_table_once() -> None:
    names = readme_settings()
    assert len(names) == len(set(names)), names
    missing = fields() - set(names)
    assert not missing, f"README's Settings table lacks {sorted(missing)}"
    assert set(names) <= fields(), set(names) - fields()


def test_the_placeholders_in_env_example_are_refused() -> None:
    from bot.settings import is_placeholder

    values = env_example()
    assert is_placeholder(values["SLACK_BOT_TOKEN"][0]) and is_placeholder(values["MOONSHOT_API_KEY"][0])
