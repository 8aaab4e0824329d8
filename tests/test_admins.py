"""Who is an admin: ADMIN_USERS without a Slack call; else users.info's is_admin / is_owner; fail closed."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bot.admins import Admins
from bot.settings import Settings, SettingsError
from tests.conftest import BotHarness
from tests.fakes.slack_api import FakeSlack

TEAM = "T0001"


async def test_admin_users_are_admins_without_asking_slack(bot: BotHarness, fake_slack: FakeSlack) -> None:
    admins = Admins(bot.deps.slack, frozenset({"U0ADMIN"}))
    before = len(fake_slack.calls)
    assert await admins.is_admin(TEAM, "U0ADMIN")
    assert len(fake_slack.calls) == before


async def test_workspace_admins_and_owners_are_admins_others_are_not(
    bot: BotHarness, fake_slack: FakeSlack
) -> None:
    for user, flags in (("U0WSADM", {"is_admin": True}), ("U0OWNER", {"is_owner": True}), ("U0PLAIN", {})):
        fake_slack.add_user(user, user.lower())
        fake_slack.users[user].update(flags)
    admins = Admins(bot.deps.slack, frozenset())
    assert await admins.is_admin(TEAM, "U0WSADM")
    assert await admins.is_admin(TEAM, "U0OWNER")
    assert not await admins.is_admin(TEAM, "U0PLAIN")
    assert not await admins.is_admin(TEAM, "")


async def test_a_failed_check_is_not_an_admin_and_is_asked_again(
    bot: BotHarness, fake_slack: FakeSlack
) -> None:
    fake_slack.add_user("U0WSADM", "boss")
    fake_slack.users["U0WSADM"]["is_admin"] = True
    admins = Admins(bot.deps.slack, frozenset())
    fake_slack.fail("users.info", "internal_error", status=200)
    assert not await admins.is_admin(TEAM, "U0WSADM")  # fail closed
    assert await admins.is_admin(TEAM, "U0WSADM")  # not remembered: asked again


async def test_a_demoted_admin_loses_the_right_once_the_short_memory_lapses(
    bot: BotHarness, fake_slack: FakeSlack
) -> None:
    fake_slack.add_user("U0WSADM", "boss")
    fake_slack.users["U0WSADM"]["is_admin"] = True
    admins = Admins(bot.deps.slack, frozenset(), ttl_s=0.0)
    assert await admins.is_admin(TEAM, "U0WSADM")
    fake_slack.users["U0WSADM"]["is_admin"] = False
    assert not await admins.is_admin(TEAM, "U0WSADM")


def test_admin_users_setting_takes_user_ids_only(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(SettingsError) as caught:
        make_settings(admin_users="U0ADMIN, S0GROUP")
    assert "ADMIN_USERS holds 'S0GROUP', not ids" in str(caught.value)
