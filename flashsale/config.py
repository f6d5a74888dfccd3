"""Settings from the environment (SPEC §3); command-line flags override them."""

import ipaddress
import os
import re
import secrets
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import msgspec

PROVIDERS = ("sandbox", "stripe", "razorpay")
WORKERS_MAX = 64
# The engine's own HMAC-SHA256 keys (tokens, sandbox webhooks) are at least as long as the hash
# (RFC 7518, 3.2); PyJWT warns of shorter ones.
SECRET_BYTES_MIN = 32
SECRETS = ("FLASHSALE_JWT_SECRET", "FLASHSALE_SANDBOX_WEBHOOK_SECRET")
# Stripe opens a checkout session for at most 24 hours: a hold that outlived it could not be paid.
STRIPE_HOLD_TTL_MAX_S = 86_400


class ConfigError(Exception):
    """Bad configuration: reported as one line, never as a traceback."""


class Limit(NamedTuple):
    requests: int
    window_s: int


DEFAULT_LIMITS = {
    "ip": Limit(100, 60),  # every route, per client address
    "order": Limit(10, 60),  # POST /orders, per user
    "login": Limit(10, 60),  # per client address
    "register": Limit(5, 60),  # per client address
    "refresh": Limit(30, 60),  # per user
}
_RULE = re.compile(r"^(\w+)=(\d+)/(\d+)$")


def parse_limits(text: str | None) -> dict[str, Limit] | None:
    """FLASHSALE_RATE_LIMITS: unset for the defaults, `off`, or `ip=100/60,order=10/60,…`."""
    if not text:
        return dict(DEFAULT_LIMITS)
    if text.strip() == "off":
        return None
    limits = dict(DEFAULT_LIMITS)
    for rule in text.split(","):
        match = _RULE.match(rule.strip())
        if match is None or match[1] not in DEFAULT_LIMITS or int(match[3]) < 1:
            raise ConfigError(f"FLASHSALE_RATE_LIMITS: cannot read {rule.strip()!r}; expected "
                              f"off, or NAME=COUNT/SECONDS with NAME one of "
                              f"{', '.join(DEFAULT_LIMITS)}")
        limits[match[1]] = Limit(int(match[2]), int(match[3]))
    return limits


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    database_url: str | None = None
    ray_address: str | None = None
    bcrypt_rounds: int = 12
    hold_ttl_s: int = 900
    cancel_window_s: int = 86_400
    payment_provider: str = "sandbox"
    public_url: str | None = None
    workers: int = 1  # front-end processes
    rate_limits: dict[str, Limit] | None = msgspec.field(default_factory=lambda: dict(
        DEFAULT_LIMITS))
    trusted_proxies: tuple[Network, ...] = ()

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"


def _int(env: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _public_url(raw: str | None) -> str | None:
    """The base of payment links and webhook deliveries, without a trailing slash."""
    if raw is None:
        return None
    url = urlsplit(raw)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"FLASHSALE_PUBLIC_URL must be an http:// or https:// URL, got {raw!r}")
    return raw.rstrip("/")


def parse_trusted_proxies(raw: str | None) -> tuple[Network, ...]:
    """FLASHSALE_TRUSTED_PROXIES: the addresses or networks of the proxies in front of the
    server (a load balancer, a TLS terminator), whose X-Forwarded-For names the client."""
    networks = []
    for item in filter(None, (part.strip() for part in (raw or "").split(","))):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError("FLASHSALE_TRUSTED_PROXIES must list addresses or networks "
                              f"(such as 10.0.0.0/8), got {item!r}") from None
    return tuple(networks)


def load_settings(env: dict[str, str] | None = None, **flags: object) -> Settings:
    """Build settings from `env` (default: the process environment) and non-None `flags`."""
    env = dict(os.environ) if env is None else env
    provider = env.get("FLASHSALE_PAYMENT_PROVIDER", "sandbox") or "sandbox"
    if provider not in PROVIDERS:
        raise ConfigError(
            f"FLASHSALE_PAYMENT_PROVIDER must be one of {', '.join(PROVIDERS)}, got {provider!r}"
        )
    stripe_keys = env.get("STRIPE_API_KEY") and env.get("STRIPE_WEBHOOK_SECRET")
    if provider == "stripe" and not stripe_keys:
        raise ConfigError("FLASHSALE_PAYMENT_PROVIDER=stripe needs STRIPE_API_KEY and "
                          "STRIPE_WEBHOOK_SECRET")
    hold_ttl_s = _int(env, "FLASHSALE_HOLD_TTL_S", 900, 1, 7 * 86_400)
    if provider == "stripe" and hold_ttl_s > STRIPE_HOLD_TTL_MAX_S:
        raise ConfigError(f"FLASHSALE_HOLD_TTL_S is at most {STRIPE_HOLD_TTL_MAX_S} with stripe, "
                          "whose checkout sessions last at most 24 hours")
    for name in SECRETS:
        if 0 < len(env.get(name, "").encode()) < SECRET_BYTES_MIN:
            raise ConfigError(f"{name} must be at least {SECRET_BYTES_MIN} bytes long")
    razorpay_keys = all(env.get(f"RAZORPAY_{name}") for name in
                        ("KEY_ID", "KEY_SECRET", "WEBHOOK_SECRET"))
    if provider == "razorpay" and not razorpay_keys:
        raise ConfigError("FLASHSALE_PAYMENT_PROVIDER=razorpay needs RAZORPAY_KEY_ID, "
                          "RAZORPAY_KEY_SECRET and RAZORPAY_WEBHOOK_SECRET")
    values: dict[str, object] = {
        "data_dir": Path(env.get("FLASHSALE_DATA_DIR") or ".flashsale"),
        "database_url": env.get("FLASHSALE_DATABASE_URL") or None,
        "ray_address": env.get("RAY_ADDRESS") or None,
        "bcrypt_rounds": _int(env, "FLASHSALE_BCRYPT_ROUNDS", 12, 4, 31),
        "hold_ttl_s": hold_ttl_s,
        "cancel_window_s": _int(env, "FLASHSALE_CANCEL_WINDOW_S", 86_400, 0, 365 * 86_400),
        "payment_provider": provider,
        "public_url": _public_url(env.get("FLASHSALE_PUBLIC_URL") or None),
        "rate_limits": parse_limits(env.get("FLASHSALE_RATE_LIMITS")),
        "trusted_proxies": parse_trusted_proxies(env.get("FLASHSALE_TRUSTED_PROXIES")),
    }
    values.update({name: value for name, value in flags.items() if value is not None})
    data_dir = values["data_dir"] = Path(str(values["data_dir"]))
    if data_dir.exists() and not data_dir.is_dir():
        raise ConfigError(f"the data dir {data_dir} is not a directory")
    port = values.get("port", 8080)
    if not isinstance(port, int) or not 1 <= port <= 65_535:
        raise ConfigError(f"--port must be between 1 and 65535, got {port}")
    workers = values.get("workers", 1)
    if not isinstance(workers, int) or not 1 <= workers <= WORKERS_MAX:
        raise ConfigError(f"--workers must be between 1 and {WORKERS_MAX}, got {workers}")
    return Settings(**values)  # type: ignore[arg-type]


def stored_secret(data_dir: Path, name: str) -> str:
    """A secret generated once and kept in the data dir (mode 0600), so restarts keep it."""
    path = data_dir / "secrets" / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Written whole to a file of its own, then linked into place: a crash or a full disk
        # cannot leave an empty secret, and of two processes at once, the first link wins.
        draft = path.with_name(f".{name}.{os.getpid()}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(48))
                handle.flush()
                os.fsync(handle.fileno())
            os.link(draft, path)
        except FileExistsError:
            pass  # another process generated it first: use theirs
        finally:
            draft.unlink(missing_ok=True)
    value = path.read_text().strip()
    if len(value.encode()) < SECRET_BYTES_MIN:
        raise ConfigError(f"the stored secret {path} is shorter than {SECRET_BYTES_MIN} bytes "
                          "(cut short when it was written?): delete it and a new one is made")
    return value
