"""Users, passwords, login sessions and API tokens (no web framework here: used by the CLI too).

Passwords are hashed with argon2id (argon2-cffi's defaults, RFC 9106 "second recommended"
parameters). Session and API tokens are 256-bit random values handed out once; the database
keeps only their sha256, so a copy of the database logs nobody in.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, func
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from dicom_node.console.models import ADMIN, ROLES, ApiToken, ConsoleSession, ConsoleUser

log = logging.getLogger("dicom_node.console.auth")
_hasher = PasswordHasher()
TOKEN_PREFIX = "umv_"  # API tokens start with this, so a leaked one is recognisable in a scan
MIN_PASSWORD_LENGTH = 10


class AuthError(ValueError):
    """A user, password or token request that cannot be satisfied; the message says why."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the user, their role, how they authenticated ("session" or "token")."""

    user_id: int
    name: str
    role: str
    via: str
    csrf_token: str | None = None  # the session's CSRF token (None for API tokens)

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


def utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def generate_password() -> str:
    """A random password for the first admin: 20 URL-safe characters (~120 bits)."""
    return secrets.token_urlsafe(15)


def add_user(engine: Engine, name: str, password: str, role: str) -> int:
    """Create a user; raises AuthError for a bad name, role, short password or an existing name."""
    name = name.strip()
    if not name or len(name) > 64 or any(c.isspace() for c in name):
        raise AuthError("a user name is 1 to 64 characters without spaces")
    if role not in ROLES:
        raise AuthError(f"role must be one of {', '.join(ROLES)}")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AuthError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    with Session(engine) as s:
        if s.exec(select(ConsoleUser).where(ConsoleUser.name == name)).first() is not None:
            raise AuthError(f"user {name!r} exists already")
        user = ConsoleUser(name=name, role=role, password_hash=_hasher.hash(password), created_at=utcnow())
        s.add(user)
        s.commit()
        s.refresh(user)
        log.info("console user created: %s (%s)", name, role)
        assert user.id is not None
        return user.id


def set_password(engine: Engine, name: str, password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AuthError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    with Session(engine) as s:
        user = s.exec(select(ConsoleUser).where(ConsoleUser.name == name)).first()
        if user is None:
            raise AuthError(f"no user {name!r}")
        user.password_hash = _hasher.hash(password)
        s.add(user)
        s.exec(delete(ConsoleSession).where(ConsoleSession.user_id == user.id))  # type: ignore[call-overload]
        s.commit()


def remove_user(engine: Engine, name: str) -> None:
    with Session(engine) as s:
        user = s.exec(select(ConsoleUser).where(ConsoleUser.name == name)).first()
        if user is None:
            raise AuthError(f"no user {name!r}")
        user.disabled = True  # kept (not deleted) so the audit trail of names stays readable
        s.add(user)
        s.exec(delete(ConsoleSession).where(ConsoleSession.user_id == user.id))  # type: ignore[call-overload]
        s.exec(delete(ApiToken).where(ApiToken.user_id == user.id))  # type: ignore[call-overload]
        s.commit()


def list_users(engine: Engine) -> list[dict[str, object]]:
    with Session(engine) as s:
        users = s.exec(select(ConsoleUser).order_by(ConsoleUser.id)).all()
        return [
            {"name": u.name, "role": u.role, "disabled": u.disabled, "created_at": u.created_at.isoformat()}
            for u in users
        ]


def user_count(engine: Engine) -> int:
    with Session(engine) as s:
        return int(s.exec(select(func.count()).select_from(ConsoleUser)).one())


def ensure_first_admin(engine: Engine, name: str = "admin") -> str | None:
    """On a database without any user: create `name` (admin) with a random password and return
    the password (to be shown once, never logged); None when users exist already."""
    if user_count(engine):
        return None
    password = generate_password()
    try:
        add_user(engine, name, password, ADMIN)
    except AuthError:  # another process created it between the count and the insert
        return None
    return password


def check_password(engine: Engine, name: str, password: str) -> ConsoleUser | None:
    """The enabled user whose password matches, else None (same work for unknown names)."""
    with Session(engine) as s:
        user = s.exec(select(ConsoleUser).where(ConsoleUser.name == name)).first()
    if user is None or user.disabled:
        _hasher.hash(password)  # spend the same time as a real check: no user enumeration by timing
        return None
    try:
        _hasher.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        return None
    return user


def create_session(engine: Engine, user: ConsoleUser, hours: float) -> tuple[str, str]:
    """A new login session; returns (cookie token, CSRF token)."""
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    now = utcnow()
    with Session(engine) as s:
        s.exec(delete(ConsoleSession).where(ConsoleSession.expires_at < now))  # type: ignore[call-overload]
        assert user.id is not None
        s.add(
            ConsoleSession(
                token_sha256=_sha256(token),
                user_id=user.id,
                csrf_token=csrf,
                created_at=now,
                expires_at=now + timedelta(hours=hours),
            )
        )
        s.commit()
    return token, csrf


def end_session(engine: Engine, token: str) -> None:
    with Session(engine) as s:
        s.exec(delete(ConsoleSession).where(ConsoleSession.token_sha256 == _sha256(token)))  # type: ignore[call-overload]
        s.commit()


def session_principal(engine: Engine, token: str) -> Principal | None:
    with Session(engine) as s:
        row = s.exec(
            select(ConsoleSession, ConsoleUser)
            .join(ConsoleUser, ConsoleUser.id == ConsoleSession.user_id)  # type: ignore[arg-type]
            .where(ConsoleSession.token_sha256 == _sha256(token))
        ).first()
    if row is None:
        return None
    sess, user = row
    if user.disabled or _aware(sess.expires_at) < utcnow():
        return None
    return Principal(user.id or 0, user.name, user.role, "session", sess.csrf_token)


def create_token(engine: Engine, name: str, label: str = "") -> str:
    """A new API token for user `name` (shown once); raises AuthError for an unknown user."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with Session(engine) as s:
        user = s.exec(select(ConsoleUser).where(ConsoleUser.name == name)).first()
        if user is None or user.disabled:
            raise AuthError(f"no user {name!r}")
        assert user.id is not None
        s.add(ApiToken(token_sha256=_sha256(token), user_id=user.id, label=label[:128], created_at=utcnow()))
        s.commit()
    log.info("API token created for %s", name)
    return token


def token_principal(engine: Engine, token: str) -> Principal | None:
    if not token.startswith(TOKEN_PREFIX):
        return None
    with Session(engine) as s:
        row = s.exec(
            select(ApiToken, ConsoleUser)
            .join(ConsoleUser, ConsoleUser.id == ApiToken.user_id)  # type: ignore[arg-type]
            .where(ApiToken.token_sha256 == _sha256(token))
        ).first()
    if row is None or row[1].disabled:
        return None
    user = row[1]
    return Principal(user.id or 0, user.name, user.role, "token")


def same_token(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))
