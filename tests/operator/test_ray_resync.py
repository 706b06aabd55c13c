"""The periodic read of a RayService keeps the status true where kopf never watches RayServices.

kopf starts watching a kind when a CRD event finds it in discovery; KubeRay's CRDs installed while
the operator runs can be Established before discovery lists them, and then no RayService event ever
arrives (CI saw Ready stuck at RayInitializing). The race cannot be provoked on demand, so this
test removes the watch altogether: no operator runs, and the daemon's step is called in this
process against the real API server, as the operator's daemon calls it.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import pytest
from forkless_operator import apply, handlers
from forkless_operator.render_ray import render_ray_service
from forkless_operator.spec import InferenceService
from kubernetes import client, config
from test_operator_cluster import (  # tests/operator is on sys.path (rootdir-less test dirs)
    conditions,
    crd,  # noqa: F401  (the module fixture that installs the InferenceService CRD)
    get_isvc,
    install_kuberay_crds,
    ray_body,
    ray_status,
    write_ray_status,
)

if TYPE_CHECKING:
    from tests.conftest import Kube

pytestmark = pytest.mark.cluster


def resync(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    """One step of the daemon for ``name``; returns the InferenceService as the API server has it after."""
    key = (namespace, name)
    isvc_index: Any = {key: [get_isvc(kube, namespace, name)]}  # kopf's index is a mapping of key to bodies
    handlers.resync_ray_service(key, isvc_index, {}, logging.getLogger("test"))
    return get_isvc(kube, namespace, name)


def test_the_daemon_reads_the_rayservice_when_no_watch_event_comes(
    kube: Kube, crd: None, namespace: str, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kube.kubeconfig), client_configuration=configuration)
    monkeypatch.setattr(apply, "_kube", apply.Kube(client.ApiClient(configuration)))  # the handlers' client
    # kopf.warn needs kopf's running context, which only the operator's event loop has: the Warning
    # events the handler would post are recorded instead.
    warnings: list[str] = []
    monkeypatch.setattr(handlers.kopf, "warn", lambda _ref, *, reason, message: warnings.append(reason))
    install_kuberay_crds(kube)
    name = "ray-resync"
    kube.apply(ray_body(name), namespace=namespace)
    body = get_isvc(kube, namespace, name)
    generation = body["metadata"]["generation"]
    # What reconcile would have written before any RayService event: children applied, Ray starting.
    now = "2026-11-26T00:00:00Z"
    written = [{"type": "Ready", "status": "False", "reason": "RayInitializing", "message": "", "lastTransitionTime": now},
               {"type": "Reconciled", "status": "True", "reason": "Applied", "message": "", "lastTransitionTime": now}]
    kube.kubectl("patch", "inferenceservice", name, "-n", namespace, "--subresource=status", "--type=merge",
                 "-p", json.dumps({"status": {"observedGeneration": generation, "conditions": written}}))
    rayservice = render_ray_service(InferenceService.model_validate(body))
    assert rayservice is not None
    kube.apply(rayservice, namespace=namespace)
    write_ray_status(kube, namespace, name, ray_status(1, ("True", "NonZeroServeEndpoints"), "DEPLOY_FAILED",
                                                       "ImportError: no module named handlers"))

    failed = conditions(resync(kube, namespace, name))["Ready"]
    assert (failed["status"], failed["reason"]) == ("False", "ServeDeployFailed"), failed
    assert "no module named handlers" in failed["message"]
    assert warnings == ["ServeDeployFailed"]
    # Nothing new on the next tick: nothing is written.
    version = get_isvc(kube, namespace, name)["metadata"]["resourceVersion"]
    assert resync(kube, namespace, name)["metadata"]["resourceVersion"] == version
    write_ray_status(kube, namespace, name, ray_status(1, ("True", "NonZeroServeEndpoints"), "RUNNING"))
    serving = conditions(resync(kube, namespace, name))["Ready"]
    assert (serving["status"], serving["reason"]) == ("True", "Serving"), serving
