"""Console tables: users, login sessions and API tokens.

Only hashes are stored: argon2id for passwords, sha256 for the random session and API tokens
(they are 256-bit random values, so a fast hash is enough). Times are aware UTC. The migration
that creates these tables is `dicom_node/migrations/versions/0006_console.py`; keep both in step.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

ADMIN = "admin"
READONLY = "readonly"
WORKER = "worker"  # remote workers' API tokens: fetch stored instances, upload job outputs, nothing else
ROLES = (ADMIN, READONLY, WORKER)


class ConsoleUser(SQLModel, table=True):
    __tablename__ = "console_user"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True)
    role: str = Field(max_length=16)
    password_hash: str = Field(max_length=255)
    created_at: datetime
    disabled: bool = False


class ConsoleSession(SQLModel, table=True):
    __tablename__ = "console_session"

    id: int | None = Field(default=None, primary_key=True)
    token_sha256: str = Field(max_length=64, unique=True)
    user_id: int = Field(foreign_key="console_user.id", index=True)
    csrf_token: str = Field(max_length=64)
    created_at: datetime
    expires_at: datetime


class ApiToken(SQLModel, table=True):
    __tablename__ = "api_token"

    id: int | None = Field(default=None, primary_key=True)
    token_sha256: str = Field(max_length=64, unique=True)
    user_id: int = Field(foreign_key="console_user.id", index=True)
    label: str = Field(default="", max_length=128)
    created_at: datetime
    last_used_at: datetime | None = None
