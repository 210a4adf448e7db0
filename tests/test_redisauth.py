"""Which Redis user a command is and where its secret comes from (gateway.redisauth), pure.

The order (docs/security.md): --redis-url (with --redis-user/--redis-secret-file), the
config's url with its user and secret, the data dir of a running embedded Redis with the
secret file of the command's user. No server: the URLs are only built.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gateway.config import RedisAuth
from gateway.redisauth import client_url, service_url
from gateway.services import ServiceError, display_url

URL = "redis://127.0.0.1:6400/0"


def args(**kw: str) -> argparse.Namespace:
    return argparse.Namespace(**{"redis_url": None, "redis_user": None, "redis_secret_file": None, **kw})


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A data dir as a running `mgms run` leaves it: the url file and the users' secrets."""
    (tmp_path / "secrets").mkdir()
    (tmp_path / "redis.url").write_text(URL + "\n")
    for user in ("gateway", "operator", "viewer"):
        (tmp_path / "secrets" / f"redis-{user}.secret").write_text(f"{user}-s3cret\n")
    return tmp_path


def test_a_command_is_its_own_user_with_the_data_dirs_secret(state: Path) -> None:
    assert client_url(args(), RedisAuth(), state, user="operator") == "redis://operator:operator-s3cret@127.0.0.1:6400/0"
    assert client_url(args(), RedisAuth(), state, user="viewer") == "redis://viewer:viewer-s3cret@127.0.0.1:6400/0"
    assert display_url(client_url(args(), RedisAuth(), state, user="viewer") or "") == "redis://viewer@127.0.0.1:6400/0"


def test_flags_pick_another_user_and_file(state: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine.secret"
    mine.write_text("mine\n")
    got = client_url(args(redis_user="operator", redis_secret_file=str(mine)), RedisAuth(), state, user="viewer")
    assert got == "redis://operator:mine@127.0.0.1:6400/0"
    # the data dir's own url given by hand (a second AMS worker): its secret comes along
    assert client_url(args(redis_url=URL), RedisAuth(), state, user="gateway") == (
        "redis://gateway:gateway-s3cret@127.0.0.1:6400/0"
    )
    # a url with credentials is taken as it is; another url without them too (an open Redis)
    assert client_url(args(redis_url="redis://u:p@h:1/0"), RedisAuth(), state, user="viewer") == "redis://u:p@h:1/0"
    assert client_url(args(redis_url="redis://h:1/0"), RedisAuth(), state, user="viewer") == "redis://h:1/0"


def test_the_configs_user_and_secret(monkeypatch: pytest.MonkeyPatch, state: Path) -> None:
    monkeypatch.setenv("TEST_REDIS_SECRET", "from env")
    settings = RedisAuth(url="redis://10.0.0.5:6379/0", user="gateway", password_env="TEST_REDIS_SECRET")
    assert service_url(args(), settings, state, user="gateway") == "redis://gateway:from%20env@10.0.0.5:6379/0"
    assert client_url(args(), RedisAuth(url="redis://10.0.0.5:6379/0"), state, user="viewer") == (
        "redis://10.0.0.5:6379/0"  # no secret configured: as it is (mgms run warns if it is open)
    )
    with pytest.raises(ServiceError, match="--redis-secret-file"):
        client_url(args(redis_user="operator"), settings, state, user="operator")


def test_no_running_service_and_a_missing_secret(tmp_path: Path, state: Path) -> None:
    assert client_url(args(), RedisAuth(), tmp_path / "none", user="viewer") is None
    assert service_url(args(), RedisAuth(), state, user="gateway") is None  # mgms run: start its own
    (state / "secrets" / "redis-viewer.secret").unlink()
    with pytest.raises(ServiceError, match=r"redis-viewer\.secret"):
        client_url(args(), RedisAuth(), state, user="viewer")
