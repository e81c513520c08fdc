"""Configuration: a TOML file plus `UNIMEDVL_<SECTION>__<KEY>` environment overrides.

`load_config(path)` reads the file (default ./unimedvl.toml if present, else the embedded
defaults), lets environment variables win over the file, resolves relative paths against the
file's folder (or the working directory for the defaults) and turns pydantic's validation
errors into one `ConfigError` that names each bad key and value.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_CONFIG_NAME = "unimedvl.toml"
ENV_PREFIX = "UNIMEDVL_"


class ConfigError(ValueError):
    """The configuration is unusable; the message names every bad key and value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _valid_ae_title(value: str) -> str:
    v = value.strip()
    if not v or len(v) > 16 or "\\" in v or any(ord(c) < 0x20 or ord(c) > 0x7E for c in v):
        raise ValueError("an AE title is 1 to 16 printable ASCII characters, without backslash")
    return v


class NodeSettings(_Section):
    ae_title: str = "UNIMEDVL"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    tls_port: int = Field(0, ge=0, le=65535)  # 0 = no TLS listener
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""  # CA bundle that client certificates must chain to
    tls_require_client_cert: bool = False
    allowed_calling_aets: list[str] = []  # empty = any calling AE title
    allowed_hosts: list[str] = []  # IPs or CIDRs; empty = any address
    max_pdu: int = Field(1_048_576, ge=0)  # our maximum receive PDU length; 0 = unlimited
    max_instance_bytes: int = Field(1_073_741_824, ge=1)
    max_associations: int = Field(32, ge=1)
    duplicate_policy: Literal["keep_first", "replace"] = "keep_first"
    listeners: int = Field(1, ge=1, le=64)  # listener processes sharing the port (SO_REUSEPORT)
    log_phi: bool = False
    # Connection guard (dicom_node/transport_guard.py): bounds on what a peer can hold.
    associate_timeout_seconds: float = Field(5.0, gt=0)  # connect -> complete A-ASSOCIATE-RQ
    pdu_timeout_seconds: float = Field(10.0, gt=0)  # idle between PDUs; also a started PDU's base allowance
    max_connections_per_host: int = Field(16, ge=1)  # open connections from one remote address
    accept_private_sop_classes: bool = False  # also accept storage of SOP classes PS3.4 does not define

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _valid_ae_title(v)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aets(cls, v: list[str]) -> list[str]:
        return [_valid_ae_title(a) for a in v]

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for entry in v:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError as exc:
                raise ValueError(f"{entry!r} is not an IP address or CIDR network") from exc
        return v

    @model_validator(mode="after")
    def _tls(self) -> NodeSettings:
        if self.tls_port:
            if not self.tls_cert or not self.tls_key:
                raise ValueError("tls_port needs tls_cert and tls_key")
            if self.tls_port == self.port:
                raise ValueError("tls_port must differ from port")
        if self.tls_require_client_cert and not self.tls_ca:
            raise ValueError("tls_require_client_cert needs tls_ca")
        return self


class StorageSettings(_Section):
    path: str = "var/storage"
    min_free_bytes: int = Field(1_073_741_824, ge=0)


class DatabaseSettings(_Section):
    url: str = "sqlite:///var/index.db"

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not v.startswith(("sqlite:", "postgresql")):
            raise ValueError("use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")
        return v


class BrokerSettings(_Section):
    url: str = "sqla+sqlite:///var/broker.db"


class HttpSettings(_Section):
    bind: str = "127.0.0.1:8080"

    @field_validator("bind")
    @classmethod
    def _bind(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("bind is HOST:PORT, e.g. 127.0.0.1:8080")
        return v

    @property
    def host(self) -> str:
        return self.bind.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.bind.rpartition(":")[2])


class WorkerSettings(_Section):
    """`[worker]`: how a worker reaches the node's stored instances. Empty `node_url` (the default):
    the worker shares `[storage] path` with the node. Set: sources are fetched over WADO-RS and
    outputs uploaded to the node (dicom_node.jobs.remote), so no shared disk is needed."""

    node_url: str = ""  # e.g. "http://gateway:8080", the node's [http] bind as the worker reaches it
    node_token: str = ""  # an API token of a user with the "worker" role (`unimedvl console token`)
    timeout_seconds: float = Field(60.0, gt=0)  # per HTTP request (connect, read a chunk, write)
    tls_ca: str = ""  # CA bundle for an https node_url (empty: the system's)

    @model_validator(mode="after")
    def _complete(self) -> WorkerSettings:
        if self.node_url:
            if not self.node_url.startswith(("http://", "https://")):
                raise ValueError("node_url must be http(s)://HOST:PORT")
            if not self.node_token:
                raise ValueError("node_url needs node_token (an API token of a worker-role user)")
        return self


class ModelSettings(_Section):
    path: str = "tiny"
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "auto"
    encoders: Literal["torch", "onnx", "tensorrt"] = "torch"
    cache_dir: str = "var/cache"


class CountSourceSettings(_Section):
    """A PACS that forwards studies to us and answers C-FIND for how many instances a series has."""

    calling_ae: str  # studies arriving from this calling AE title are counted by asking ...
    ae_title: str  # ... this C-FIND SCP (usually the same PACS)
    host: str
    port: int = Field(104, ge=1, le=65535)
    timeout_seconds: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _titles(self) -> CountSourceSettings:
        _valid_ae_title(self.calling_ae)
        _valid_ae_title(self.ae_title)
        return self


class CompletionSettings(_Section):
    study_quiet_seconds: float = Field(60.0, gt=0)
    series_quiet_seconds: float = Field(30.0, gt=0)
    force_complete_seconds: float = Field(3600.0, gt=0)
    check_interval_seconds: float = Field(0.25, gt=0)
    # Accept Modality Performed Procedure Step N-CREATE/N-SET (dicom_node/mpps.py) on the listener.
    mpps: bool = True
    # Complete a series once it holds as many instances as each of them says in ImagesInAcquisition.
    images_in_acquisition: bool = True
    # How long after its last instance an announced series (count not reached, MPPS IN PROGRESS or
    # missing instances) is held back from the quiet rule; force_complete_seconds still applies.
    announced_wait_seconds: float = Field(600.0, gt=0)
    # Opt-in per calling AE: ask the sending PACS (C-FIND, SERIES level) for NumberOfSeriesRelatedInstances.
    count_sources: list[CountSourceSettings] = []


class ExportSettings(_Section):
    max_attempts: int = Field(8, ge=1)
    backoff_initial_seconds: float = Field(5.0, gt=0)
    backoff_max_seconds: float = Field(600.0, gt=0)
    poll_seconds: float = Field(0.25, gt=0)  # safety net: commits that queue rows wake the exporter
    keep_open_seconds: float = Field(2.0, ge=0)  # 0: one association per batch


class ConsoleSettings(_Section):
    session_hours: float = Field(12.0, gt=0)  # a login lasts this long
    cookie_secure: bool = False  # set when the console is served over HTTPS (a proxy terminating TLS)
    allowed_origins: list[str] = []  # extra Origins accepted on POSTs (e.g. the proxy's https://host)
    phi_roles: list[Literal["admin", "readonly"]] = ["admin"]  # roles that see patient name/ID (never in URLs or logs)
    viewer_url: str = ""  # e.g. "https://pacs/ohif/viewer?StudyInstanceUIDs={study_uid}"
    first_admin: str = "admin"  # the user `serve` creates, with a printed password, on an empty database


class HealthSettings(_Section):
    destination_failing_seconds: float = Field(60.0, gt=0)  # undelivered outputs with errors older than this
    worker_silence_seconds: float = Field(300.0, gt=0)  # jobs waiting and no worker activity for this long
    queued_age_seconds: float = Field(600.0, gt=0)  # the oldest planned/queued job older than this
    failed_window_seconds: float = Field(3600.0, gt=0)  # failed jobs/deliveries in this window degrade /readyz
    broker_timeout_seconds: float = Field(2.0, gt=0)


class DestinationSettings(_Section):
    name: str = Field(min_length=1, max_length=64)
    kind: Literal["dimse", "dicomweb"]
    ae_title: str = ""
    host: str = ""
    port: int = Field(104, ge=1, le=65535)
    url: str = ""
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    calling_ae: str = ""
    timeout_seconds: float = Field(30.0, gt=0)
    labelmap: bool = False

    @model_validator(mode="after")
    def _complete(self) -> DestinationSettings:
        if self.kind == "dimse" and (not self.ae_title or not self.host):
            raise ValueError("a dimse destination needs ae_title and host")
        if self.kind == "dicomweb" and not self.url.startswith(("http://", "https://")):
            raise ValueError("a dicomweb destination needs url = http(s)://...")
        if self.ae_title:
            _valid_ae_title(self.ae_title)
        return self


class Settings(BaseSettings):
    """The whole configuration. `config_path` is the file it came from (None = embedded defaults)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

    node: NodeSettings = NodeSettings()
    storage: StorageSettings = StorageSettings()
    database: DatabaseSettings = DatabaseSettings()
    broker: BrokerSettings = BrokerSettings()
    http: HttpSettings = HttpSettings()
    model: ModelSettings = ModelSettings()
    completion: CompletionSettings = CompletionSettings()
    export: ExportSettings = ExportSettings()
    console: ConsoleSettings = ConsoleSettings()
    health: HealthSettings = HealthSettings()
    worker: WorkerSettings = WorkerSettings()
    destinations: list[DestinationSettings] = []
    rules: list[dict[str, Any]] | None = None  # validated by dicom_node.routing; None = shipped defaults
    jobs: dict[str, Any] = {}  # validated by dicom_node.jobs (JobSettings)
    batch: dict[str, Any] = {}  # validated by dicom_node.batch (BatchSettings)
    config_path: Path | None = Field(default=None, exclude=True)

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, v: list[DestinationSettings]) -> list[DestinationSettings]:
        names = [d.name for d in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique: {', '.join(dupes)}")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file (the file's values arrive as init kwargs).
        return (env_settings, init_settings)

    @property
    def base_dir(self) -> Path:
        return self.config_path.parent if self.config_path else Path.cwd()


def _resolve(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _resolve_sqlite(base: Path, url: str) -> str:
    # sqlite:///relative.db is relative; sqlite:////abs.db and sqlite:// (memory) stay as they are.
    for prefix in ("sqlite:///", "sqla+sqlite:///"):
        if url.startswith(prefix):
            rest = url[len(prefix) :]
            if rest and not rest.startswith("/") and not rest.startswith(":memory:"):
                return prefix + _resolve(base, rest)
    return url


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        env_name = ENV_PREFIX + "__".join(str(p) for p in err["loc"]).upper()
        where = f" (from {env_name})" if env_name in os.environ else ""
        value = err.get("input")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif err["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        elif isinstance(value, dict):
            lines.append(f"  {key}: {msg}")
        else:
            lines.append(f"  {key} = {value!r}{where}: {msg}")
    return "\n".join(lines)


def _rule_errors(rules: list[dict[str, Any]] | None) -> list[str]:
    """`[[rules]]` checked at load time, one line per problem: the rule (index and name), the key
    and the reason, so a bad rule stops every command with exit 2 instead of a traceback later."""
    if rules is None:
        return []
    from dicom_node.routing import Rule

    lines: list[str] = []
    names: list[str] = []
    for i, raw in enumerate(rules):
        name = raw.get("name") if isinstance(raw, dict) else None
        label = f'rules[{i}] "{name}"' if name else f"rules[{i}]"
        try:
            rule = Rule.model_validate(raw)
        except ValidationError as exc:
            for err in exc.errors():
                key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] == "extra_forbidden":
                    msg = "unknown key"
                elif err["type"] == "missing":
                    msg = "required key is missing"
                lines.append(f"  {label}: {key or '(the rule)'}: {msg}")
            continue
        names.append(rule.name)
    for dupe in sorted({n for n in names if names.count(n) > 1}):
        lines.append(f'  rules "{dupe}": name: used by more than one rule')
    return lines


def load_config(path: str | Path | None = None) -> Settings:
    """Read settings from `path` (or ./unimedvl.toml if present, else defaults) plus the environment."""
    if path is None and Path(DEFAULT_CONFIG_NAME).is_file():
        path = Path(DEFAULT_CONFIG_NAME)
    raw: dict[str, Any] = {}
    source = "embedded defaults"
    cfg_path: Path | None = None
    if path is not None:
        cfg_path = Path(path).expanduser().resolve()
        source = str(cfg_path)
        try:
            raw = tomllib.loads(cfg_path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {cfg_path}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {cfg_path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {cfg_path} is not valid TOML: {exc}") from exc
    if "config_path" in raw:
        raise ConfigError(f"invalid configuration ({source}):\n  config_path: unknown key")
    try:
        settings = Settings(**raw, config_path=cfg_path)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source + " + UNIMEDVL_* environment")) from None
    bad_rules = _rule_errors(settings.rules)
    if bad_rules:
        raise ConfigError("\n".join([f"invalid routing rules ({source}):", *bad_rules]))
    base = settings.base_dir
    settings.storage.path = _resolve(base, settings.storage.path)
    settings.model.cache_dir = _resolve(base, settings.model.cache_dir)
    if settings.model.path != "tiny":
        settings.model.path = _resolve(base, settings.model.path)
    settings.database.url = _resolve_sqlite(base, settings.database.url)
    settings.broker.url = _resolve_sqlite(base, settings.broker.url)
    if settings.worker.tls_ca:
        settings.worker.tls_ca = _resolve(base, settings.worker.tls_ca)
    for key in ("tls_cert", "tls_key", "tls_ca"):
        if getattr(settings.node, key):
            setattr(settings.node, key, _resolve(base, getattr(settings.node, key)))
    for d in settings.destinations:
        for key in ("tls_ca", "tls_cert", "tls_key"):
            if getattr(d, key):
                setattr(d, key, _resolve(base, getattr(d, key)))
    return settings
