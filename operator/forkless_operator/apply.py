"""Server-side apply of the children and of the InferenceService's status.

kopf has no server-side apply, so the operator talks to the API server itself
with the ``kubernetes`` client (already a dependency, and what kopf logs in
with). We send the PATCH through ``ApiClient.param_serialize``/``call_api`` with
``application/apply-patch+yaml`` to a path built from a static table of our five
kinds, rather than through the dynamic client: the dynamic client runs API
discovery at start-up and on cache misses, which costs seconds and requests that
a controller with a fixed set of kinds does not need; and the typed API methods
would have us convert our plain-dict manifests into model objects and back.

Every write uses one field manager, ``forkless-operator``, with ``force=true``:
the operator owns the fields it renders and takes them back from anyone who
edited them (drift repair), while fields it does not render (``replicas`` under
an autoscaler, annotations added by other tools) stay with their owners.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from forkless_operator import kinds
from forkless_operator.spec import API_VERSION, KIND

FIELD_MANAGER = "forkless-operator"
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"

# (apiVersion, kind) -> resource plural, for every kind the operator writes or reads.
PLURALS = {(k.api_version, k.kind): k.plural for k in kinds.ALL}


def object_path(api_version: str, kind: str, namespace: str, name: str, subresource: str | None = None) -> str:
    """/api/v1/namespaces/ns/services/x, /apis/apps/v1/namespaces/ns/deployments/x/status, ..."""
    prefix = "/api" if "/" not in api_version else "/apis"
    path = f"{prefix}/{api_version}/namespaces/{namespace}/{PLURALS[(api_version, kind)]}/{name}"
    return f"{path}/{subresource}" if subresource else path


def load_config() -> client.ApiClient:
    """An API client from the in-cluster service account, else from KUBECONFIG / ~/.kube/config."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    # One connection per handler thread, or threads queue on the pool.
    configuration.connection_pool_maxsize = 32
    return client.ApiClient(configuration)


class Kube:
    """The few API calls the operator makes, on plain dicts."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> dict[str, Any]:
        """One HTTP call; raises ApiException for any status outside 2xx."""
        request = self.api_client.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(*request, _request_timeout=timeout)
        data = response.read()
        if not 200 <= response.status <= 299:
            raise ApiException(http_resp=response)
        return json.loads(data) if data else {}

    def apply(self, manifest: dict[str, Any], subresource: str | None = None) -> dict[str, Any]:
        """Server-side apply ``manifest`` as forkless-operator, taking conflicting fields; returns the object."""
        meta = manifest["metadata"]
        path = object_path(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"], subresource)
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        return self.request("PATCH", path, body=manifest, query=query, content_type=APPLY_CONTENT_TYPE)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", object_path(api_version, kind, namespace, name))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete one object; False when it was already gone."""
        try:
            self.request("DELETE", object_path(api_version, kind, namespace, name))
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    def apply_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """Write the InferenceService's status through /status; fields left out are removed."""
        manifest = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": name, "namespace": namespace},
            "status": status,
        }
        return self.apply(manifest, subresource="status")


_lock = threading.Lock()
_kube: Kube | None = None


def get_kube() -> Kube:
    """The process's API client, configured on first use."""
    global _kube
    with _lock:
        if _kube is None:
            _kube = Kube(load_config())
        return _kube


def is_retryable(error: ApiException) -> bool:
    """Conflicts, throttling and server errors pass; other 4xx mean the request itself is wrong."""
    status = error.status or 0
    return status in (409, 429) or status >= 500 or status == 0
