"""Auth over real HTTP: register, login, refresh rotation, profile, password change, JWT attacks."""

import asyncio
import time
import uuid
from typing import Any

import jwt
import pytest
from helpers import JWT_SECRET, Api

from flashsale.persistence.users import drop_spent_refresh_tokens


async def test_register_then_login_returns_tokens_and_the_user(api: Api) -> None:
    status, user, _ = await api.call("POST", "/auth/register", body={
        "email": "Asha@Example.com", "password": "sale-day-1", "full_name": "Asha Rao",
        "phone": "+919876543210"})
    assert status == 201
    assert set(user) == {"id", "email", "full_name", "phone", "address", "is_active",
                         "is_admin", "created_at"}
    assert (user["is_admin"], user["is_active"], user["phone"]) == (False, True, "+919876543210")
    assert "access_token" not in user

    status, body, _ = await api.call("POST", "/auth/login",
                                     body={"email": "asha@example.com", "password": "sale-day-1"})
    assert status == 200
    assert (body["token_type"], body["expires_in"]) == ("bearer", 3600)
    assert body["user"]["id"] == user["id"]
    claims = jwt.decode(body["access_token"], JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == user["id"] and claims["exp"] - claims["iat"] == 3600
    status, me, _ = await api.call("GET", "/auth/me", body["access_token"])
    assert status == 200 and me == user


async def test_emails_are_unique_case_insensitively(api: Api) -> None:
    new = {"email": "dup@example.com", "password": "sale-day-1", "full_name": "First"}
    assert (await api.call("POST", "/auth/register", body=new))[0] == 201
    status, body, _ = await api.call("POST", "/auth/register",
                                     body={**new, "email": "DUP@example.com"})
    assert (status, body["code"]) == (409, "email_taken")


@pytest.mark.parametrize("password", ["short-1", "no-digits-here", "n0specials", "é" * 36 + "-1",
                                      "a-1" + "x" * 70])
async def test_weak_passwords_are_refused(api: Api, password: str) -> None:
    status, body, _ = await api.call("POST", "/auth/register", body={
        "email": f"{uuid.uuid4().hex}@example.com", "password": password, "full_name": "Weak"})
    assert (status, body["code"]) == (400, "weak_password")
    assert body["status"] == 400 and body["title"] and body["detail"] and body["type"]


@pytest.mark.parametrize("change", [
    {"email": "not-an-email"}, {"full_name": "A"}, {"phone": "98765"},
    {"is_admin": True}, {"id": str(uuid.uuid4())},
])
async def test_bad_or_unknown_registration_fields_are_refused(api: Api,
                                                            change: dict[str, Any]) -> None:
    base = {"email": f"{uuid.uuid4().hex}@example.com", "password": "sale-day-1",
            "full_name": "Valid Name"}
    status, body, headers = await api.call("POST", "/auth/register", body={**base, **change})
    assert (status, body["code"]) == (400, "validation_error")
    assert headers["Content-Type"].startswith("application/problem+json")


async def test_wrong_email_and_wrong_password_look_the_same(api: Api) -> None:
    email, _ = await api.register()
    wrong_password = await api.call("POST", "/auth/login",
                                    body={"email": email, "password": "sale-day-2"})
    unknown_email = await api.call("POST", "/auth/login",
                                   body={"email": "nobody@example.com", "password": "sale-day-1"})
    too_long = await api.call("POST", "/auth/login", body={"email": email, "password": "x" * 100})
    for status, body, _ in (wrong_password, unknown_email, too_long):
        assert (status, body["code"]) == (401, "invalid_credentials")
    assert wrong_password[1] == unknown_email[1]


async def test_refresh_tokens_rotate_and_work_once(api: Api) -> None:
    email, _ = await api.register()
    _, login, _ = await api.call("POST", "/auth/login",
                                 body={"email": email, "password": "sale-day-1"})
    status, fresh, _ = await api.call("POST", "/auth/refresh",
                                      body={"refresh_token": login["refresh_token"]})
    assert status == 200 and fresh["refresh_token"] != login["refresh_token"]
    assert (await api.call("GET", "/auth/me", fresh["access_token"]))[0] == 200
    status, body, _ = await api.call("POST", "/auth/refresh",
                                     body={"refresh_token": login["refresh_token"]})
    assert (status, body["code"]) == (401, "invalid_token")
    status, _, _ = await api.call("POST", "/auth/refresh", body={"refresh_token": "garbage"})
    assert status == 401


async def test_refresh_tokens_that_can_no_longer_be_used_are_dropped(api: Api) -> None:
    """Every login and refresh stores a token: the spent and the expired are swept."""
    email, _ = await api.register()
    logins = [(await api.call("POST", "/auth/login",
                              body={"email": email, "password": "sale-day-1"}))[1]
              for _ in range(3)]
    spent, expired, live = (login["refresh_token"] for login in logins)
    status, fresh, _ = await api.call("POST", "/auth/refresh", body={"refresh_token": spent})
    assert status == 200
    db = api.engine.db
    await db.execute("UPDATE refresh_tokens SET expires_at = now() WHERE id = $1",
                     uuid.UUID(expired.partition(".")[0]))

    assert await drop_spent_refresh_tokens(db) == 2
    for token, works in ((spent, False), (expired, False), (live, True),
                         (fresh["refresh_token"], True)):
        status, _, _ = await api.call("POST", "/auth/refresh", body={"refresh_token": token})
        assert (status == 200) is works, token


async def test_patch_me_changes_the_profile_but_not_the_email(api: Api) -> None:
    email, token = await api.register()
    status, user, _ = await api.call("PATCH", "/auth/me", token, {
        "full_name": "New Name", "phone": "+14155550100", "address": "1 Market St"})
    assert status == 200
    assert (user["full_name"], user["phone"], user["address"]) == (
        "New Name", "+14155550100", "1 Market St")
    status, body, _ = await api.call("PATCH", "/auth/me", token, {"email": "x@example.com"})
    assert (status, body["code"]) == (400, "validation_error")
    assert (await api.call("GET", "/auth/me", token))[1]["email"] == email


async def test_changing_the_password_ends_older_refresh_tokens(api: Api) -> None:
    email, token = await api.register()
    _, login, _ = await api.call("POST", "/auth/login",
                                 body={"email": email, "password": "sale-day-1"})
    status, body, _ = await api.call("POST", "/auth/change-password", token, {
        "current_password": "wrong-pass-1", "new_password": "new-pass-2!"})
    assert (status, body["code"]) == (401, "invalid_credentials")
    status, body, _ = await api.call("POST", "/auth/change-password", token, {
        "current_password": "sale-day-1", "new_password": "weak"})
    assert (status, body["code"]) == (400, "weak_password")
    status, _, _ = await api.call("POST", "/auth/change-password", token, {
        "current_password": "sale-day-1", "new_password": "new-pass-2!"})
    assert status == 200
    status, _, _ = await api.call("POST", "/auth/refresh",
                                  body={"refresh_token": login["refresh_token"]})
    assert status == 401
    assert (await api.call("POST", "/auth/login",
                           body={"email": email, "password": "new-pass-2!"}))[0] == 200


def _token(claims: dict[str, Any], key: str = JWT_SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


async def test_forged_or_broken_tokens_are_refused(api: Api) -> None:
    now = int(time.time())
    user = str(uuid.uuid4())
    forged = [
        jwt.encode({"sub": user, "iat": now, "exp": now + 60}, None, algorithm="none"),
        _token({"sub": user, "iat": now, "exp": now + 60}, key="another-secret-of-enough-length!"),
        _token({"sub": user, "iat": now - 120, "exp": now - 60}),
        _token({"sub": user, "iat": now}),
        _token({"sub": user, "exp": now + 60}),
        _token({"iat": now, "exp": now + 60}),
        _token({"sub": 7, "iat": now, "exp": now + 60}),
        _token({"sub": user, "aud": "pay", "exp": now + 60}),  # a payment link's
        _token({"sub": user, "aud": "pay", "iat": now, "exp": now + 60}),
        "not-a-jwt",
    ]
    for token in forged:
        status, body, headers = await api.call("GET", "/orders", token)
        assert (status, body["code"]) == (401, "invalid_token"), token
        assert headers["WWW-Authenticate"] == "Bearer"
    _, good = await api.register()
    for authorization in ({}, {"Authorization": f"Basic {good}"}):
        status, body, _ = await api.call("GET", "/orders", headers=authorization)
        assert (status, body["code"]) == (401, "invalid_token"), authorization


async def test_a_token_accepted_before_is_refused_once_it_expires(api: Api) -> None:
    """Front ends remember the tokens they verified, until each one's expiry and no longer."""
    _, token = await api.register()
    user = jwt.decode(token, JWT_SECRET, algorithms=["HS256"])["sub"]
    expires_at = int(time.time()) + 2
    short_lived = _token({"sub": user, "iat": expires_at - 2, "exp": expires_at})
    assert (await api.call("GET", "/orders", short_lived))[0] == 200
    assert (await api.call("GET", "/orders", short_lived))[0] == 200
    await asyncio.sleep(expires_at - time.time() + 0.1)
    status, body, _ = await api.call("GET", "/orders", short_lived)
    assert (status, body["code"]) == (401, "invalid_token")
    tampered = short_lived[:-2] + ("AA" if short_lived[-2:] != "AA" else "BB")
    assert (await api.call("GET", "/orders", tampered))[0] == 401


async def test_a_deactivated_user_loses_access(api: Api) -> None:
    email, token = await api.register()
    assert (await api.call("GET", "/orders", token))[0] == 200
    await api.engine.db.execute("UPDATE users SET is_active = false WHERE email = $1", email)
    for _ in range(50):
        status, _, _ = await api.call("GET", "/orders", token)
        if status == 401:
            break
        await asyncio.sleep(0.1)
    assert status == 401
    status, _, _ = await api.call("POST", "/auth/login",
                                  body={"email": email, "password": "sale-day-1"})
    assert status == 401


async def test_oversized_bodies_and_unknown_routes_are_problems(api: Api) -> None:
    status, body, _ = await api.call("POST", "/auth/register", body={"x": "y" * 100_000})
    assert (status, body["code"]) == (413, "payload_too_large")
    status, body, _ = await api.call("GET", "/no/such/route")
    assert (status, body["code"]) == (404, "not_found")
    status, body, _ = await api.call("DELETE", "/auth/me")
    assert status == 405


async def test_malformed_json_is_a_validation_error(api: Api) -> None:
    async with api.session.post("/auth/login", data=b"{not json",
                                headers={"Content-Type": "application/json"}) as reply:
        body = await reply.json(content_type=None)
    assert (reply.status, body["code"]) == (400, "validation_error")
