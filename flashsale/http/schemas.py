"""Request and response bodies. Requests reject unknown fields, so a client can never set
`price`, `status`, `user_id` or `is_admin` where the API does not ask for them."""

import datetime as dt
import uuid
from typing import Annotated, TypeVar

import msgspec
from aiohttp import web

from flashsale.actors.product import STOCK_MAX
from flashsale.http.problems import ApiError

# PostgreSQL text cannot hold NUL: refused here, a NUL would fail the query that stores it.
NO_NUL = r"^[^\x00]*$"
Text = Annotated[str, msgspec.Meta(pattern=NO_NUL)]
Email = Annotated[str, msgspec.Meta(pattern=r"^[^@\s\x00]+@[^@\s\x00]+\.[^@\s\x00]+$",
                                    max_length=254)]
Phone = Annotated[str, msgspec.Meta(pattern=r"^\+[1-9][0-9]{1,14}$")]
FullName = Annotated[str, msgspec.Meta(min_length=2, max_length=100, pattern=NO_NUL)]
Address = Annotated[str, msgspec.Meta(max_length=500, pattern=NO_NUL)]
AwareTime = Annotated[dt.datetime, msgspec.Meta(tz=True)]


class Request(msgspec.Struct, forbid_unknown_fields=True):
    pass


class RegisterRequest(Request):
    email: Email
    password: Text
    full_name: FullName
    phone: Phone | None = None


class LoginRequest(Request):
    email: Text
    password: Text


class RefreshRequest(Request):
    refresh_token: Text


class PatchMeRequest(Request):
    full_name: FullName | msgspec.UnsetType = msgspec.UNSET
    phone: Phone | None | msgspec.UnsetType = msgspec.UNSET
    address: Address | None | msgspec.UnsetType = msgspec.UNSET


class ChangePasswordRequest(Request):
    current_password: Text
    new_password: Text


class ProductCreate(Request):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=NO_NUL)]
    price: Annotated[int, msgspec.Meta(ge=0, le=10**12)]
    stock: Annotated[int, msgspec.Meta(ge=0, le=STOCK_MAX)]
    sale_starts_at: AwareTime
    sale_ends_at: AwareTime
    currency: str = "INR"  # checked against ISO 4217 by the route
    per_user_limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1


class RestockRequest(Request):
    quantity: Annotated[int, msgspec.Meta(ge=1, le=STOCK_MAX)]


class OrderCreate(Request):
    product_id: uuid.UUID
    quantity: Annotated[int, msgspec.Meta(ge=1, le=10)]


class CancelRequest(Request):
    reason: Annotated[str, msgspec.Meta(max_length=500, pattern=NO_NUL)] | None = None


class UserView(msgspec.Struct):
    id: str
    email: str
    full_name: str
    phone: str | None
    address: str | None
    is_active: bool
    is_admin: bool
    created_at: str


class ProductView(msgspec.Struct):
    id: str
    name: str
    price: int
    currency: str
    stock: int
    available: int
    reserved: int
    sold: int
    sale_starts_at: str
    sale_ends_at: str
    per_user_limit: int
    status: str


class OrderView(msgspec.Struct):
    id: str
    user_id: str
    product_id: str
    quantity: int
    unit_price: int
    total_amount: int
    currency: str
    status: str
    payment_provider: str | None
    payment_url: str | None
    payment_id: str | None
    refund_status: str
    refund_amount: int
    expires_at: str
    confirmed_at: str | None
    created_at: str
    updated_at: str


T = TypeVar("T")


def rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def rfc3339_ms(epoch_ms: int) -> str:
    return rfc3339(dt.datetime.fromtimestamp(epoch_ms / 1000, dt.UTC))


async def read_body(request: web.Request, kind: type[T]) -> T:
    """Decode and validate a JSON body; anything malformed is a 400 with the reason."""
    raw = await request.read()
    try:
        return msgspec.json.decode(raw or b"{}", type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as error:
        raise ApiError("validation_error", str(error)) from None


def json_response(body: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=msgspec.json.encode(body),
                        content_type="application/json")
