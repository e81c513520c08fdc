"""`unimedvl users ...`: console users and API tokens; the first-run admin of `serve`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

users_app = typer.Typer(help="Console users and API tokens", no_args_is_help=True)
ConfigOption = typer.Option(None, "--config", "-c", help="config file (default ./unimedvl.toml if present)")


def _engine(config: Path | None) -> Any:
    from dicom_node.config import ConfigError, load_config
    from dicom_node.db import init_db, make_engine

    try:
        settings = load_config(config)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    init_db(settings.database.url)
    return make_engine(settings.database.url)


def _password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\n")
    return typer.prompt("password", hide_input=True, confirmation_prompt=True)


def _act(config: Path | None, action: Any) -> Any:
    """Run `action(engine)`; an AuthError is one readable line on stderr and exit status 2."""
    from dicom_node.console.auth import AuthError

    engine = _engine(config)
    try:
        return action(engine)
    except AuthError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    finally:
        engine.dispose()


@users_app.command("add")
def add(
    name: str = typer.Argument(..., help="user name"),
    role: str = typer.Option("readonly", "--role", help="admin, readonly or worker (remote workers' API tokens)"),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="read the password from stdin"),
    config: Path | None = ConfigOption,
) -> None:
    """Create a console user (the password is prompted for, or read from stdin)."""
    from dicom_node.console.auth import add_user

    password = _password(password_stdin)
    _act(config, lambda engine: add_user(engine, name, password, role))
    typer.echo(f"user {name} ({role}) created")


@users_app.command("passwd")
def passwd(
    name: str = typer.Argument(...),
    password_stdin: bool = typer.Option(False, "--password-stdin"),
    config: Path | None = ConfigOption,
) -> None:
    """Set a user's password (their sessions end)."""
    from dicom_node.console.auth import set_password

    password = _password(password_stdin)
    _act(config, lambda engine: set_password(engine, name, password))
    typer.echo(f"password of {name} changed")


@users_app.command("remove")
def remove(name: str = typer.Argument(...), config: Path | None = ConfigOption) -> None:
    """Disable a user and revoke their sessions and API tokens."""
    from dicom_node.console.auth import remove_user

    _act(config, lambda engine: remove_user(engine, name))
    typer.echo(f"user {name} disabled")


@users_app.command("list")
def list_(config: Path | None = ConfigOption) -> None:
    """Users with their role."""
    from dicom_node.console.auth import list_users

    for u in _act(config, list_users):
        flag = "\tdisabled" if u["disabled"] else ""
        typer.echo(f"{u['name']}\t{u['role']}{flag}")


@users_app.command("token")
def token(
    name: str = typer.Argument(..., help="the user the token acts as"),
    label: str = typer.Option("", "--label", help="what the token is for"),
    config: Path | None = ConfigOption,
) -> None:
    """Create an API token for scripts (printed once; send it as `Authorization: Bearer TOKEN`)."""
    from dicom_node.console.auth import create_token

    typer.echo(_act(config, lambda engine: create_token(engine, name, label)))


def announce_first_admin(settings: Any, url: str) -> None:
    """On an empty user table: create the admin and print its password once (stderr, never logged)."""
    from dicom_node.console.auth import ensure_first_admin
    from dicom_node.db import init_db, make_engine

    init_db(settings.database.url)  # idempotent; the node runs it again at start
    engine = make_engine(settings.database.url)
    name = settings.console.first_admin
    try:
        password = ensure_first_admin(engine, name)
    finally:
        engine.dispose()
    if password:
        typer.echo(
            f"\nConsole {url}: first start, user {name!r} (admin) created with password\n\n    {password}\n\n"
            "It is shown only this once and stored hashed; change it with "
            f"`unimedvl users passwd {name}`.\n",
            err=True,
        )


def register(app: typer.Typer) -> None:
    app.add_typer(users_app, name="users")
