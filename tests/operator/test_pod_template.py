"""spec.podTemplate: what it adds to the rendered pod, and what the operator owns and refuses."""

from __future__ import annotations

import re
from typing import Any

import pytest
from forkless_operator import spec
from forkless_operator.render import render_deployment
from forkless_operator.settings import Settings
from forkless_operator.spec import InferenceService
from pydantic import ValidationError

SETTINGS = Settings(runtime_image="registry.test/forkless-runtime:1")


def isvc(pod_template: dict[str, Any], **extra: Any) -> InferenceService:
    return InferenceService.model_validate({
        "metadata": {"name": "m", "namespace": "ns", "uid": "u"},
        "spec": {"model": {"uri": "s3://bucket/m.pt"}, "resources": {"cpu": "2", "memory": "4Gi"},
                 "podTemplate": pod_template, **extra}})


def pod(service: InferenceService) -> dict[str, Any]:
    template: dict[str, Any] = render_deployment(service, SETTINGS)["spec"]["template"]
    return template


def container(template: dict[str, Any], name: str = "runtime") -> dict[str, Any]:
    return next(c for c in template["spec"]["containers"] if c["name"] == name)


def test_the_runtime_entry_adds_limits_mounts_and_env_after_the_operators() -> None:
    plain = pod(isvc({}))
    merged = pod(isvc({"spec": {
        "containers": [{"name": "runtime",
                        "resources": {"limits": {"cpu": 4, "ephemeral-storage": "2Gi"},
                                      "requests": {"ephemeral-storage": "1Gi"}},
                        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                        "env": [{"name": "LOG_LEVEL", "value": "debug"}],
                        "securityContext": {"readOnlyRootFilesystem": True},
                        "lifecycle": {"preStop": {"sleep": {"seconds": 1}}}}],
        "volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}}]}}))
    runtime, before = container(merged), container(plain)
    assert runtime["resources"] == {"requests": {"cpu": "2", "memory": "4Gi", "ephemeral-storage": "1Gi"},
                                    "limits": {"memory": "4Gi", "cpu": "4", "ephemeral-storage": "2Gi"}}
    assert runtime["volumeMounts"] == [*before["volumeMounts"], {"name": "scratch", "mountPath": "/scratch"}]
    assert runtime["env"] == [*before["env"], {"name": "LOG_LEVEL", "value": "debug"}]
    assert runtime["securityContext"] == {**before["securityContext"], "readOnlyRootFilesystem": True}
    assert runtime["lifecycle"] == {"preStop": {"sleep": {"seconds": 1}}}
    assert runtime["command"] == before["command"] and runtime["readinessProbe"] == before["readinessProbe"]
    assert merged["spec"]["volumes"] == [*plain["spec"]["volumes"], {"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}}]


def test_pod_fields_sidecars_and_init_containers_are_added() -> None:
    template = pod(isvc({
        "metadata": {"labels": {"team": "vision"}, "annotations": {"prometheus.io/scrape": "true"}},
        "spec": {"containers": [{"name": "proxy", "image": "envoy:1", "args": ["-c", "/etc/envoy.yaml"],
                                 "ports": [{"containerPort": 9901}]}],
                 "initContainers": [{"name": "warm-cache", "image": "busybox", "command": ["true"]}],
                 "imagePullSecrets": [{"name": "regcred"}], "runtimeClassName": "nvidia",
                 "securityContext": {"fsGroup": 2000, "supplementalGroups": [3000]}}}))
    assert template["metadata"]["labels"]["team"] == "vision"
    assert template["metadata"]["labels"]["app.kubernetes.io/instance"] == "m"
    assert template["metadata"]["annotations"] == {"prometheus.io/scrape": "true"}
    assert [c["name"] for c in template["spec"]["containers"]] == ["runtime", "proxy"]
    assert container(template, "proxy") == {"name": "proxy", "image": "envoy:1", "args": ["-c", "/etc/envoy.yaml"],
                                             "ports": [{"containerPort": 9901}]}
    assert [c["name"] for c in template["spec"]["initContainers"]] == ["download-model", "warm-cache"]
    assert template["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert template["spec"]["runtimeClassName"] == "nvidia"
    security = template["spec"]["securityContext"]
    assert security["fsGroup"] == 2000 and security["supplementalGroups"] == [3000] and security["runAsNonRoot"]


def test_no_pod_template_renders_the_same_pod() -> None:
    base = {"metadata": {"name": "m", "namespace": "ns", "uid": "u"}, "spec": {"model": {"uri": "s3://bucket/m.pt"}}}
    without = render_deployment(InferenceService.model_validate(base), SETTINGS)
    empty = render_deployment(InferenceService.model_validate({**base, "spec": {**base["spec"], "podTemplate": {}}}),
                              SETTINGS)
    assert without == empty


@pytest.mark.parametrize(("pod_template", "rule"), [
    ({"spec": {"containers": [{"name": "runtime", "args": ["--workers", "9"]}]}}, spec.RUNTIME_COMMAND_RULE),
    ({"spec": {"containers": [{"name": "runtime", "image": "x:1"}]}}, spec.RUNTIME_IMAGE_RULE),
    ({"spec": {"containers": [{"name": "runtime", "livenessProbe": {"exec": {"command": ["true"]}}}]}},
     spec.RUNTIME_PROBES_RULE),
    ({"spec": {"containers": [{"name": "runtime", "env": [{"name": "FORKLESS_MAX_QUEUE", "value": "1"}]}]}},
     spec.FORKLESS_ENV_RULE),
    ({"spec": {"containers": [{"name": "proxy", "image": "p", "resources": {"requests": {"nvidia.com/gpu": 1}}}]}},
     spec.GPU_RESOURCE_RULE),
    ({"spec": {"initContainers": [{"name": "i", "image": "p", "resources": {"limits": {"amd.com/gpu": 1}}}]}},
     spec.GPU_RESOURCE_RULE),
    ({"spec": {"containers": [{"name": "runtime", "volumeMounts": [{"name": "s", "mountPath": "/dev/shm"}]}]}},
     spec.SHM_MOUNT_RULE),
    ({"spec": {"initContainers": [{"name": "download-model", "image": "p"}]}}, spec.INIT_CONTAINER_NAME_RULE),
    ({"spec": {"volumes": [{"name": "dshm", "emptyDir": {}}]}}, spec.VOLUME_NAME_RULE),
    ({"metadata": {"labels": {"app.kubernetes.io/name": "x"}}}, spec.SELECTOR_LABEL_RULE),
])
def test_what_the_operator_owns_is_refused_with_the_reason(pod_template: dict[str, Any], rule: spec.Rule) -> None:
    with pytest.raises(ValidationError, match=re.escape(rule.message)):
        isvc(pod_template)


def test_a_sidecar_may_set_what_the_runtime_container_may_not() -> None:
    template = pod(isvc({"spec": {"containers": [{"name": "helper", "image": "h:1", "command": ["serve"],
                                                  "env": [{"name": "FORKLESS_X", "value": "1"}],
                                                  "readinessProbe": {"tcpSocket": {"port": 1}}}]}}))
    assert container(template, "helper")["command"] == ["serve"]
