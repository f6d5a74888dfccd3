"""Register, log in, refresh (rotating, single-use), profile and password change."""

import asyncpg
import msgspec
from aiohttp import web

from flashsale.http.auth import ACCESS_TTL_S, password_problem
from flashsale.http.engine import ENGINE, Engine
from flashsale.http.problems import ApiError
from flashsale.http.schemas import (
    ChangePasswordRequest,
    LoginRequest,
    PatchMeRequest,
    RefreshRequest,
    RegisterRequest,
    UserView,
    json_response,
    read_body,
    rfc3339,
)
from flashsale.persistence import users


def user_view(record: asyncpg.Record) -> UserView:
    return UserView(id=record["id"], email=record["email"], full_name=record["full_name"],
                    phone=record["phone"], address=record["address"],
                    is_active=record["is_active"], is_admin=record["is_admin"],
                    created_at=rfc3339(record["created_at"]))


async def _token_pair(engine: Engine, user_id: str) -> dict[str, object]:
    return {
        "access_token": engine.tokens.access_token(user_id),
        "token_type": "bearer",
        "expires_in": ACCESS_TTL_S,
        "refresh_token": await users.issue_refresh_token(engine.db, user_id),
    }


async def register(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = await read_body(request, RegisterRequest)
    weakness = password_problem(body.password)
    if weakness:
        raise ApiError("weak_password", weakness)
    password_hash = await engine.passwords.hash(body.password)
    try:
        record = await users.create_user(engine.db, body.email, password_hash, body.full_name,
                                         body.phone)
    except users.EmailTaken:
        raise ApiError("email_taken") from None
    return json_response(user_view(record), status=201)


async def login(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = await read_body(request, LoginRequest)
    found = await users.credentials(engine.db, body.email)
    stored_hash = found["password_hash"] if found else None
    matches = await engine.passwords.verify(body.password, stored_hash)
    if found is None or not matches or not found["is_active"]:
        raise ApiError("invalid_credentials")
    record = await users.user_by_id(engine.db, found["id"])
    return json_response({**await _token_pair(engine, found["id"]), "user": user_view(record)})


async def refresh(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = await read_body(request, RefreshRequest)
    owner = await users.refresh_token_owner(engine.db, body.refresh_token)
    if owner is not None:
        await engine.limit("refresh", owner)
    user_id = await users.use_refresh_token(engine.db, body.refresh_token)
    if user_id is None:
        raise ApiError("invalid_token", "the refresh token is unknown, used or expired")
    return json_response(await _token_pair(engine, user_id))


async def me(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    record = await users.user_by_id(engine.db, engine.user(request))
    if record is None:
        raise ApiError("invalid_token", "the account no longer exists")
    return json_response(user_view(record))


async def patch_me(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    user_id = engine.user(request)
    body = await read_body(request, PatchMeRequest)
    changes = {name: value for name, value in msgspec.structs.asdict(body).items()
               if value is not msgspec.UNSET}
    if not changes:
        record = await users.user_by_id(engine.db, user_id)
    else:
        record = await users.update_profile(engine.db, user_id, changes)
    return json_response(user_view(record))


async def change_password(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    user_id = engine.user(request)
    body = await read_body(request, ChangePasswordRequest)
    current_hash = await users.password_hash_of(engine.db, user_id)
    if not await engine.passwords.verify(body.current_password, current_hash):
        raise ApiError("invalid_credentials", "the current password is wrong")
    weakness = password_problem(body.new_password)
    if weakness:
        raise ApiError("weak_password", weakness)
    await users.set_password(engine.db, user_id, await engine.passwords.hash(body.new_password))
    return json_response({"status": "password_changed"})
