"""A structural check of KEDA objects (keda.sh/v1alpha1), which kubernetes-validate has no schema for.

The field lists follow KEDA's documentation (ScaledObject spec, TriggerAuthentication, the
RabbitMQ Queue scaler's trigger metadata) for KEDA 2.12 and later. `check_keda(obj)` returns one
sentence per problem; an empty list means the object is well formed.
"""

from __future__ import annotations

from typing import Any

SCALED_OBJECT_SPEC = {
    "scaleTargetRef",
    "pollingInterval",
    "cooldownPeriod",
    "initialCooldownPeriod",
    "idleReplicaCount",
    "minReplicaCount",
    "maxReplicaCount",
    "fallback",
    "advanced",
    "triggers",
}
SCALE_TARGET_REF = {"name", "apiVersion", "kind", "envSourceContainerName"}
FALLBACK = {"failureThreshold", "replicas", "behavior"}
ADVANCED = {"restoreToOriginalReplicaCount", "horizontalPodAutoscalerConfig", "scalingModifiers"}
HPA_CONFIG = {"name", "behavior"}
TRIGGER = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
AUTH_REF = {"name", "kind"}
METRIC_TYPES = {"AverageValue", "Value", "Utilization"}
RABBITMQ_METADATA = {
    "host",
    "hostFromEnv",
    "usernameFromEnv",
    "passwordFromEnv",
    "protocol",
    "mode",
    "value",
    "activationValue",
    "queueName",
    "vhostName",
    "useRegex",
    "excludeUnacknowledged",
    "pageSize",
    "operation",
    "timeout",
    "unsafeSsl",
}
RABBITMQ_ENUMS = {
    "protocol": {"auto", "http", "amqp"},
    "mode": {"QueueLength", "MessageRate"},
    "useRegex": {"true", "false"},
    "excludeUnacknowledged": {"true", "false"},
    "operation": {"sum", "max", "avg"},
}
TRIGGER_AUTH_SPEC = {
    "secretTargetRef",
    "env",
    "configMapTargetRef",
    "podIdentity",
    "hashiCorpVault",
    "azureKeyVault",
    "gcpSecretManager",
    "awsSecretManager",
    "boundServiceAccountToken",
}
SECRET_TARGET_REF = {"parameter", "name", "key"}


def _unknown(where: str, value: Any, allowed: set[str]) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where} must be a mapping"]
    return [f"{where}.{k}: unknown field" for k in sorted(set(value) - allowed)]


def _int(where: str, value: Any, minimum: int = 0) -> list[str]:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        return [f"{where} must be an integer >= {minimum}, not {value!r}"]
    return []


def _number_string(where: str, value: Any) -> list[str]:
    if not isinstance(value, str):
        return [f"{where} must be a string (trigger metadata is map[string]string), not {value!r}"]
    try:
        float(value)
    except ValueError:
        return [f"{where} = {value!r} is not a number"]
    return []


def _rabbitmq(where: str, meta: dict[str, Any]) -> list[str]:
    out = _unknown(where, meta, RABBITMQ_METADATA)
    for key, value in meta.items():
        if not isinstance(value, str):
            out.append(f"{where}.{key} must be a string (trigger metadata is map[string]string), not {value!r}")
    for key, allowed in RABBITMQ_ENUMS.items():
        if key in meta and meta[key] not in allowed:
            out.append(f"{where}.{key} = {meta[key]!r}: one of {sorted(allowed)}")
    if not meta.get("queueName"):
        out.append(f"{where}.queueName is required")
    for key in ("value", "activationValue"):
        if key in meta:
            out += _number_string(f"{where}.{key}", meta[key])
    if "value" not in meta:
        out.append(f"{where}.value is required (the target per replica)")
    return out


def _scaled_object(obj: dict[str, Any]) -> list[str]:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return ["spec is required"]
    out = _unknown("spec", spec, SCALED_OBJECT_SPEC)
    ref = spec.get("scaleTargetRef")
    if not isinstance(ref, dict) or not ref.get("name"):
        out.append("spec.scaleTargetRef.name is required")
    else:
        out += _unknown("spec.scaleTargetRef", ref, SCALE_TARGET_REF)
    for key in ("pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount", "minReplicaCount"):
        if key in spec:
            out += _int(f"spec.{key}", spec[key])
    if "maxReplicaCount" in spec:
        out += _int("spec.maxReplicaCount", spec["maxReplicaCount"], 1)
    lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
        out.append(f"spec.minReplicaCount {lo} > spec.maxReplicaCount {hi}")
    if "fallback" in spec:
        fb = spec["fallback"]
        out += _unknown("spec.fallback", fb, FALLBACK)
        if isinstance(fb, dict):
            out += _int("spec.fallback.failureThreshold", fb.get("failureThreshold"), 1)
            out += _int("spec.fallback.replicas", fb.get("replicas"), 0)
    if "advanced" in spec:
        adv = spec["advanced"]
        out += _unknown("spec.advanced", adv, ADVANCED)
        if isinstance(adv, dict) and "horizontalPodAutoscalerConfig" in adv:
            out += _unknown(
                "spec.advanced.horizontalPodAutoscalerConfig", adv["horizontalPodAutoscalerConfig"], HPA_CONFIG
            )
    triggers = spec.get("triggers")
    if not isinstance(triggers, list) or not triggers:
        return [*out, "spec.triggers must be a non-empty list"]
    names = [t.get("name") for t in triggers if isinstance(t, dict) and t.get("name")]
    if len(names) != len(set(names)):
        out.append("spec.triggers: trigger names must be unique")
    for i, trig in enumerate(triggers):
        where = f"spec.triggers[{i}]"
        out += _unknown(where, trig, TRIGGER)
        if not isinstance(trig, dict):
            continue
        if not trig.get("type"):
            out.append(f"{where}.type is required")
        if "metricType" in trig and trig["metricType"] not in METRIC_TYPES:
            out.append(f"{where}.metricType = {trig['metricType']!r}: one of {sorted(METRIC_TYPES)}")
        if "authenticationRef" in trig:
            auth = trig["authenticationRef"]
            out += _unknown(f"{where}.authenticationRef", auth, AUTH_REF)
            if isinstance(auth, dict) and not auth.get("name"):
                out.append(f"{where}.authenticationRef.name is required")
        meta = trig.get("metadata")
        if trig.get("type") == "rabbitmq":
            if not isinstance(meta, dict):
                out.append(f"{where}.metadata is required")
            else:
                out += _rabbitmq(f"{where}.metadata", meta)
    return out


def _trigger_authentication(obj: dict[str, Any]) -> list[str]:
    spec = obj.get("spec")
    if not isinstance(spec, dict) or not spec:
        return ["spec is required"]
    out = _unknown("spec", spec, TRIGGER_AUTH_SPEC)
    for i, ref in enumerate(spec.get("secretTargetRef") or []):
        where = f"spec.secretTargetRef[{i}]"
        out += _unknown(where, ref, SECRET_TARGET_REF)
        if isinstance(ref, dict):
            out += [f"{where}.{k} is required" for k in sorted(SECRET_TARGET_REF) if not ref.get(k)]
    return out


CHECKS = {"ScaledObject": _scaled_object, "TriggerAuthentication": _trigger_authentication}


def check_keda(obj: dict[str, Any]) -> list[str]:
    """Problems of one keda.sh/v1alpha1 object (empty when it is well formed)."""
    if obj.get("apiVersion") != "keda.sh/v1alpha1":
        return [f"apiVersion {obj.get('apiVersion')!r} is not keda.sh/v1alpha1"]
    check = CHECKS.get(obj.get("kind", ""))
    if check is None:
        return [f"kind {obj.get('kind')!r} is not a KEDA kind this check knows"]
    if not (obj.get("metadata") or {}).get("name"):
        return ["metadata.name is required"]
    return check(obj)
