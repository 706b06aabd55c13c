"""The operator's configuration: one object, read once from FORKLESS_OPERATOR_* variables.

The Helm chart's ConfigMap sets these; the renderers take the object as an
argument so that they stay pure and tests can pass their own.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from forkless_runtime.settings import LOG_FORMATS

ENV_PREFIX = "FORKLESS_OPERATOR_"


@dataclass(frozen=True)
class Settings:
    runtime_image: str = "ghcr.io/forkless/forkless-runtime:0.1.0"
    """Image of the runtime container when spec.runtime.image is omitted."""
    ray_image: str = "ghcr.io/forkless/forkless-ray:0.1.0"
    """Image of the Ray pods (engine ray) when spec.runtime.image is omitted: the runtime's plus ray[serve]."""
    image_pull_policy: str = "IfNotPresent"
    gpu_resource_name: str = "nvidia.com/gpu"
    """Extended resource that counts GPUs when spec.resources.gpuResourceName is omitted."""
    gpu_taint_key: str = "nvidia.com/gpu"
    """Taint that GPU node pools carry; GPU pods tolerate it (Exists, NoSchedule)."""
    default_tolerations: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)
    """Tolerations added to every runtime pod (JSON list in the environment)."""
    runtime_user: int = 1000
    """Non-root uid and gid the runtime runs as."""
    cluster_domain: str = "cluster.local"
    log_format: str = "json"
    """--log-format of the runtime when spec.runtime.logFormat is omitted: text or json."""
    scaler_address: str = "forkless-scaler.forkless-system.svc.cluster.local:9091"
    """host:port where KEDA reaches the operator's external scaler (autoscaling.class keda); the chart sets it."""
    scaler_port: int = 9091
    """Port the operator serves KEDA's external scaler protocol on (0: not served)."""
    prometheus_address: str = ""
    """A Prometheus that scrapes the runtime pods: when set, class keda renders a Prometheus trigger instead."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from FORKLESS_OPERATOR_<FIELD> variables; unset ones keep their defaults."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, current in cls.__dataclass_fields__.items():
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is None:
                continue
            if name == "default_tolerations":
                parsed = json.loads(raw)
                if not isinstance(parsed, list) or not all(isinstance(t, dict) for t in parsed):
                    raise ValueError(f"{ENV_PREFIX}DEFAULT_TOLERATIONS must be a JSON list of objects")
                values[name] = tuple(parsed)
            elif current.type == "int":
                values[name] = int(raw)
            else:
                values[name] = raw
        if values.get("log_format", cls.log_format) not in LOG_FORMATS:
            raise ValueError(
                f"{ENV_PREFIX}LOG_FORMAT must be one of {', '.join(LOG_FORMATS)} (forkless-runtime --log-format), "
                f"got {values['log_format']!r}"
            )
        return cls(**values)


@functools.cache
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings.from_env()
