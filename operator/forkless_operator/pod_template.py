"""spec.podTemplate merged onto the pod template the operator renders. Pure; no API calls.

What a user may add is additive or the user's own: labels, annotations, sidecars, init containers
(after the model download), volumes, imagePullSecrets, runtimeClassName, security context fields.
The entry named `runtime` merges into the runtime container: its env and volumeMounts come after
the operator's, its resources and securityContext fields are set over the operator's, anything
else (envFrom, lifecycle, ...) is set as given. What the operator owns is refused before this runs,
by the CRD's CEL rules (forkless_operator.spec), so nothing here needs to overrule the user.
"""

from __future__ import annotations

from typing import Any

from forkless_operator.spec import PodTemplate

JsonDict = dict[str, Any]


def apply_pod_template(template: JsonDict, pod_template: PodTemplate | None, runtime_container: str) -> JsonDict:
    """``template`` (a Deployment's spec.template) with ``pod_template`` merged in, as a new dict."""
    if pod_template is None:
        return template
    metadata = dict(template["metadata"])
    spec = dict(template["spec"])
    if pod_template.metadata is not None:
        if pod_template.metadata.labels:
            metadata["labels"] = {**pod_template.metadata.labels, **metadata.get("labels", {})}
        if pod_template.metadata.annotations:
            metadata["annotations"] = {**metadata.get("annotations", {}), **pod_template.metadata.annotations}
    given = pod_template.spec
    if given is not None:
        containers = [dict(c) for c in spec["containers"]]
        for entry in given.containers or []:
            fields = _dump(entry)
            if entry.name == runtime_container:
                index = next(i for i, c in enumerate(containers) if c["name"] == runtime_container)
                containers[index] = merge_container(containers[index], fields)
            else:
                containers.append(fields)
        spec["containers"] = containers
        if given.init_containers:
            spec["initContainers"] = [*spec.get("initContainers", []), *(_dump(c) for c in given.init_containers)]
        if given.volumes:
            spec["volumes"] = [*spec.get("volumes", []), *(_dump(v) for v in given.volumes)]
        if given.image_pull_secrets:
            spec["imagePullSecrets"] = [dict(s) for s in given.image_pull_secrets]
        if given.runtime_class_name:
            spec["runtimeClassName"] = given.runtime_class_name
        if given.security_context:
            spec["securityContext"] = {**spec.get("securityContext", {}), **given.security_context}
    return {**template, "metadata": metadata, "spec": spec}


def merge_container(container: JsonDict, fields: JsonDict) -> JsonDict:
    """The runtime container with the template's entry for it merged in."""
    merged = dict(container)
    for key, value in fields.items():
        if key == "name":
            continue
        if key in ("env", "volumeMounts", "envFrom"):
            merged[key] = [*container.get(key, []), *value]
        elif key == "resources":
            resources = dict(container.get("resources", {}))
            for kind, quantities in value.items():
                if kind in ("limits", "requests"):
                    resources[kind] = {**resources.get(kind, {}), **{k: str(q) for k, q in quantities.items()}}
                else:
                    resources[kind] = quantities
            merged[key] = resources
        elif key == "securityContext":
            merged[key] = {**container.get(key, {}), **value}
        else:
            merged[key] = value
    return merged


def _dump(model: Any) -> JsonDict:
    """A template entry as the API takes it: camelCase, unset fields left out, unknown fields kept."""
    dumped: JsonDict = model.model_dump(by_alias=True, exclude_none=True)
    return dumped
