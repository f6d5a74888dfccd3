"""Every error is RFC 9457 problem+json; this module is the one place codes map to statuses."""

import logging
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web

from flashsale.actors.messages import Rejection
from flashsale.persistence.database import DATABASE_DOWN

log = logging.getLogger(__name__)

STATUS_OF: dict[str, int] = {
    "validation_error": 400,
    "idempotency_key_missing": 400,
    "weak_password": 400,
    "invalid_credentials": 401,
    "invalid_token": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "email_taken": 409,
    "out_of_stock": 409,
    "purchase_limit_exceeded": 409,
    "sale_not_active": 409,
    "invalid_order_state": 409,
    "cancellation_window_closed": 409,
    "idempotency_request_in_progress": 409,
    "payment_mismatch": 409,
    "idempotency_key_reused": 422,
    "rate_limited": 429,
    "internal_error": 500,
    "payment_refused": 502,
    "unavailable": 503,
}

TITLE_OF: dict[str, str] = {
    "validation_error": "The request is not valid",
    "idempotency_key_missing": "X-Idempotency-Key header is required",
    "weak_password": "The password is too weak",
    "invalid_credentials": "Wrong email or password",
    "invalid_token": "Missing, expired or invalid token",
    "forbidden": "Not allowed",
    "not_found": "Not found",
    "method_not_allowed": "Method not allowed",
    "payload_too_large": "The request body is too large",
    "email_taken": "The email is already registered",
    "out_of_stock": "Not enough units left",
    "purchase_limit_exceeded": "Purchase limit for this product reached",
    "sale_not_active": "The sale is not active",
    "invalid_order_state": "The order cannot do that in its current state",
    "cancellation_window_closed": "The cancellation window has closed",
    "idempotency_request_in_progress": "A request with this key is still in progress",
    "payment_mismatch": "The payment does not match the order",
    "idempotency_key_reused": "The idempotency key was used for a different request",
    "rate_limited": "Too many requests",
    "internal_error": "Internal error",
    "payment_refused": "The payment gateway refused this payment",
    "unavailable": "Temporarily unavailable, retry shortly",
}

RETRY_AFTER_S = {"unavailable": 1, "rate_limited": 1}


class ApiError(Exception):
    """An outcome the client must see as a problem document."""

    def __init__(self, code: str, detail: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail or code)
        self.code = code
        self.detail = detail or TITLE_OF[code]
        self.headers = headers or {}


def rejected(rejection: Rejection, detail: str | None = None) -> ApiError:
    return ApiError(rejection.value, detail)


def problem(code: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    status = STATUS_OF[code]
    body = {"type": f"https://flashsale.dev/problems/{code.replace('_', '-')}",
            "title": TITLE_OF[code], "status": status, "detail": detail, "code": code}
    all_headers = dict(headers or {})
    if code in RETRY_AFTER_S:
        all_headers.setdefault("Retry-After", str(RETRY_AFTER_S[code]))
    return web.Response(status=status, body=msgspec.json.encode(body), headers=all_headers,
                        content_type="application/problem+json")


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return problem(error.code, error.detail, error.headers)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        code = _HTTP_CODES.get(error.status, "validation_error")
        return problem(code, error.reason or TITLE_OF[code])
    except DATABASE_DOWN as error:
        return problem("unavailable", f"the database cannot answer now ({type(error).__name__})")
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem("internal_error", "The server failed to answer; this is a bug.")
