"""Download credentials the way KServe users already keep them, turned into the init container's env.

Pure: the reconcile reads the ServiceAccount and Secrets, this module decides what they mean.
KServe's conventions, so that its samples apply verbatim (pkg/credentials in kserve/kserve):

- which Secrets: the one the ``serving.kserve.io/storageSecretName`` annotation names, else every
  Secret listed under the ServiceAccount's ``secrets``;
- S3: data keys ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (or ``awsAccessKeyID``/
  ``awsSecretAccessKey``) by reference, and the ``serving.kserve.io/s3-*`` annotations (on the Secret,
  or on the ServiceAccount for IRSA) as plain values;
- GCS: data key ``gcloud-application-credentials.json``, mounted at /var/secrets/ with
  ``GOOGLE_APPLICATION_CREDENTIALS`` pointing at it;
- Hugging Face: data key ``HF_TOKEN`` by reference.

Secret values never pass through the operator: the pod reads them by ``secretKeyRef``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

STORAGE_SECRET_ANNOTATION = "serving.kserve.io/storageSecretName"
IRSA_ROLE_ANNOTATION = "eks.amazonaws.com/role-arn"
S3_KEY_NAMES = (("AWS_ACCESS_KEY_ID", "awsAccessKeyID"), ("AWS_SECRET_ACCESS_KEY", "awsSecretAccessKey"))
GCS_KEY_FILE = "gcloud-application-credentials.json"
GCS_MOUNT_PATH = "/var/secrets"
HF_TOKEN = "HF_TOKEN"

_S3 = "serving.kserve.io/s3-"
# Annotation suffix -> the variable KServe's webhook sets from it (pkg/credentials/s3/utils.go).
S3_ANNOTATION_ENV = (
    ("endpoint", "S3_ENDPOINT"),
    ("usehttps", "S3_USE_HTTPS"),
    ("region", "AWS_DEFAULT_REGION"),
    ("verifyssl", "S3_VERIFY_SSL"),
    ("useanoncredential", "awsAnonymousCredential"),
    ("usevirtualbucket", "S3_USER_VIRTUAL_BUCKET"),
    ("useaccelerate", "S3_USE_ACCELERATE"),
    ("cabundle", "AWS_CA_BUNDLE"),
)


@dataclass(frozen=True)
class StorageCredentials:
    """What the download init container gets: env (values and secretKeyRefs), volumes and their mounts."""

    env: tuple[dict[str, Any], ...] = ()
    volumes: tuple[dict[str, Any], ...] = ()
    mounts: tuple[dict[str, Any], ...] = ()
    secrets: tuple[str, ...] = field(default=())  # the Secrets they came from, for messages


NO_CREDENTIALS = StorageCredentials()


def secret_names(annotations: Mapping[str, str], service_account: Mapping[str, Any] | None) -> list[str]:
    """The Secrets to read, in KServe's precedence: the annotation's one, else the ServiceAccount's."""
    named = annotations.get(STORAGE_SECRET_ANNOTATION)
    if named:
        return [named]
    listed = (service_account or {}).get("secrets") or []
    return [str(entry["name"]) for entry in listed if entry.get("name")]


def _s3_annotation_env(annotations: Mapping[str, str]) -> list[dict[str, Any]]:
    env = [{"name": name, "value": annotations[_S3 + suffix]} for suffix, name in S3_ANNOTATION_ENV
           if annotations.get(_S3 + suffix)]
    endpoint = annotations.get(_S3 + "endpoint")
    if endpoint:
        https = annotations.get(_S3 + "usehttps", "1") != "0"
        url = endpoint if "://" in endpoint else ("https://" if https else "http://") + endpoint
        env.append({"name": "AWS_ENDPOINT_URL", "value": url})
    return env


def _secret_ref(variable: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": variable, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def storage_credentials(secrets: Iterable[Mapping[str, Any]],
                        service_account: Mapping[str, Any] | None = None) -> StorageCredentials:
    """The init container's credentials from the Secrets (as read, in precedence order) and the ServiceAccount.

    The first Secret to provide a variable wins; data keys are read by name only.
    """
    env: dict[str, dict[str, Any]] = {}
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    names: list[str] = []

    def add(entries: Iterable[dict[str, Any]]) -> None:
        for entry in entries:
            env.setdefault(entry["name"], entry)

    account_annotations = ((service_account or {}).get("metadata") or {}).get("annotations") or {}
    for secret in secrets:
        metadata = secret.get("metadata") or {}
        name = str(metadata.get("name", ""))
        data = {**(secret.get("data") or {}), **(secret.get("stringData") or {})}
        names.append(name)
        for variable, alternative in S3_KEY_NAMES:
            key = variable if variable in data else alternative if alternative in data else None
            if key is not None:
                add([_secret_ref(variable, name, key)])
        if any(variable in env for variable, _ in S3_KEY_NAMES):
            add(_s3_annotation_env(metadata.get("annotations") or {}))
        if HF_TOKEN in data:
            add([_secret_ref(HF_TOKEN, name, HF_TOKEN)])
        if GCS_KEY_FILE in data and not volumes:
            volumes.append({"name": "user-gcp-sa", "secret": {"secretName": name, "items": [
                {"key": GCS_KEY_FILE, "path": GCS_KEY_FILE}]}})
            mounts.append({"name": "user-gcp-sa", "mountPath": GCS_MOUNT_PATH, "readOnly": True})
            add([{"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": f"{GCS_MOUNT_PATH}/{GCS_KEY_FILE}"}])
    if account_annotations.get(IRSA_ROLE_ANNOTATION):
        # IRSA: the EKS webhook injects the role and its projected token; the endpoint and region
        # come from the ServiceAccount's own s3 annotations.
        add(_s3_annotation_env(account_annotations))
    return StorageCredentials(tuple(env.values()), tuple(volumes), tuple(mounts), tuple(names))
