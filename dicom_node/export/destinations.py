"""Destinations and export policy, read from the node's Settings ([export], [[destinations]])."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


@dataclass(frozen=True)
class Destination:
    name: str
    kind: str  # "dimse" | "dicomweb"
    ae_title: str = ""
    host: str = ""
    port: int = 104
    url: str = ""
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    calling_ae: str = "UNIMEDVL"
    timeout_seconds: float = 30.0
    labelmap: bool = False  # the destination takes Label Map Segmentation Storage (66.7)

    @classmethod
    def from_config(cls, cfg: Any, *, default_calling_ae: str = "UNIMEDVL") -> Destination:
        kind = str(_get(cfg, "kind", "dimse")).lower()
        if kind not in ("dimse", "dicomweb"):
            raise ValueError(f"destination {_get(cfg, 'name')!r}: kind must be 'dimse' or 'dicomweb', not {kind!r}")
        dest = cls(
            name=str(_get(cfg, "name")),
            kind=kind,
            ae_title=str(_get(cfg, "ae_title", "") or ""),
            host=str(_get(cfg, "host", "") or ""),
            port=int(_get(cfg, "port", 104) or 104),
            url=str(_get(cfg, "url", "") or "").rstrip("/"),
            tls=bool(_get(cfg, "tls", False)),
            tls_ca=_get(cfg, "tls_ca") or None,
            tls_cert=_get(cfg, "tls_cert") or None,
            tls_key=_get(cfg, "tls_key") or None,
            calling_ae=str(_get(cfg, "calling_ae", None) or default_calling_ae),
            timeout_seconds=float(_get(cfg, "timeout_seconds", 30) or 30),
            labelmap=bool(_get(cfg, "labelmap", False)),
        )
        if kind == "dimse" and not (dest.ae_title and dest.host):
            raise ValueError(f"destination {dest.name!r}: a dimse destination needs ae_title, host and port")
        if kind == "dicomweb" and not dest.url:
            raise ValueError(f"destination {dest.name!r}: a dicomweb destination needs url (the STOW-RS base URL)")
        return dest

    def address(self) -> str:
        return self.url if self.kind == "dicomweb" else f"{self.ae_title}@{self.host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """Client TLS context: the configured CA (else system CAs), client certificate if given."""
        if not (self.tls or self.url.startswith("https://")):
            return None
        ctx = ssl.create_default_context(cafile=self.tls_ca) if self.tls_ca else ssl.create_default_context()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # PS3.15 B.10: no downgrade below TLS 1.2
        if self.tls_cert:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx


@dataclass(frozen=True)
class ExportPolicy:
    max_attempts: int = 8
    backoff_initial_seconds: float = 5.0
    backoff_max_seconds: float = 600.0
    poll_seconds: float = 0.25  # safety net: the exporter is woken by the commit that queues rows
    keep_open_seconds: float = 2.0  # a DIMSE association stays open this long after its last send
    batch_size: int = 500  # rows claimed per destination at a time
    parallel: int = 4  # concurrent associations / STOW requests per destination for a batch
    lease_seconds: float = 60.0  # renewed every lease/3 while sending; an expired lease means the exporter died
    stow_max_instances: int = 64  # instances per STOW-RS request
    stow_max_bytes: int = 64 * 1024 * 1024

    @classmethod
    def from_config(cls, cfg: Any) -> ExportPolicy:
        if cfg is None:
            return cls()
        base = cls()
        values = {k: _get(cfg, k, None) for k in base.__dataclass_fields__}
        kwargs = {k: type(getattr(base, k))(v) for k, v in values.items() if v is not None}
        policy = cls(**kwargs)
        if policy.max_attempts < 1:
            raise ValueError("[export] max_attempts must be >= 1")
        return policy


def destinations_from_settings(settings: Any) -> list[Destination]:
    node = _get(settings, "node")
    calling = str(_get(node, "ae_title", "UNIMEDVL") or "UNIMEDVL") if node is not None else "UNIMEDVL"
    dests = [Destination.from_config(d, default_calling_ae=calling) for d in (_get(settings, "destinations") or [])]
    names = [d.name for d in dests]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"duplicate destination names: {sorted(dupes)}")
    return dests
