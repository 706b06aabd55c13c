"""Download credentials from Secrets as KServe keeps them: which Secrets, which variables, no values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from forkless_operator.credentials import secret_names, storage_credentials
from forkless_operator.render import render_deployment
from forkless_operator.settings import Settings
from forkless_operator.spec import InferenceService

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "kserve" / "s3-secret.yaml"
SETTINGS = Settings(runtime_image="registry.test/forkless-runtime:1")


def kserve_sample() -> tuple[dict[str, Any], dict[str, Any]]:
    secret, account = yaml.safe_load_all(SAMPLE.read_text())
    return secret, account


def env_by_name(env: Any) -> dict[str, Any]:
    return {entry["name"]: entry.get("value", entry.get("valueFrom")) for entry in env}


def test_kserves_s3_sample_becomes_the_variables_its_webhook_would_set() -> None:
    secret, account = kserve_sample()
    assert secret_names({}, account) == ["mysecret"]
    credentials = storage_credentials([secret], account)
    assert env_by_name(credentials.env) == {
        "AWS_ACCESS_KEY_ID": {"secretKeyRef": {"name": "mysecret", "key": "AWS_ACCESS_KEY_ID"}},
        "AWS_SECRET_ACCESS_KEY": {"secretKeyRef": {"name": "mysecret", "key": "AWS_SECRET_ACCESS_KEY"}},
        "S3_ENDPOINT": "s3.amazonaws.com",
        "S3_USE_HTTPS": "1",
        "AWS_DEFAULT_REGION": "us-east-2",
        "awsAnonymousCredential": "false",
        "AWS_ENDPOINT_URL": "https://s3.amazonaws.com",
    }
    assert "XXXX" not in str(credentials)  # values stay in the Secret


def test_minio_over_http_and_kserves_older_key_names() -> None:
    secret = {"metadata": {"name": "minio", "annotations": {"serving.kserve.io/s3-endpoint": "minio.kubeflow:9000",
                                                            "serving.kserve.io/s3-usehttps": "0"}},
              "data": {"awsAccessKeyID": "eA==", "awsSecretAccessKey": "eQ=="}}
    env = env_by_name(storage_credentials([secret]).env)
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "minio", "key": "awsAccessKeyID"}}
    assert env["AWS_ENDPOINT_URL"] == "http://minio.kubeflow:9000"


def test_the_annotation_names_the_secret_before_the_service_account() -> None:
    _, account = kserve_sample()
    assert secret_names({"serving.kserve.io/storageSecretName": "storage"}, account) == ["storage"]
    assert secret_names({}, None) == []


def test_gcs_key_files_and_hugging_face_tokens() -> None:
    gcs = {"metadata": {"name": "gcs"}, "data": {"gcloud-application-credentials.json": "e30="}}
    hf = {"metadata": {"name": "hf"}, "data": {"HF_TOKEN": "aGY="}}
    credentials = storage_credentials([gcs, hf])
    env = env_by_name(credentials.env)
    assert env["GOOGLE_APPLICATION_CREDENTIALS"] == "/var/secrets/gcloud-application-credentials.json"
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}}
    assert credentials.mounts == ({"name": "user-gcp-sa", "mountPath": "/var/secrets", "readOnly": True},)
    assert credentials.volumes[0]["secret"]["secretName"] == "gcs"


def test_irsa_takes_the_endpoint_from_the_service_accounts_annotations() -> None:
    account = {"metadata": {"name": "sa", "annotations": {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123:role/models", "serving.kserve.io/s3-region": "eu-west-1"}}}
    assert env_by_name(storage_credentials([], account).env) == {"AWS_DEFAULT_REGION": "eu-west-1"}


def test_the_init_container_gets_the_credentials_and_the_runtime_does_not() -> None:
    secret, account = kserve_sample()
    isvc = InferenceService.model_validate({
        "metadata": {"name": "cnn", "namespace": "ml", "uid": "u"},
        "spec": {"model": {"uri": "s3://models/cnn"}, "serviceAccountName": "sa"},
    })
    pod = render_deployment(isvc, SETTINGS, storage_credentials([secret], account))["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert "AWS_SECRET_ACCESS_KEY" in env_by_name(init["env"])
    runtime_env = env_by_name(pod["containers"][0]["env"])
    assert not any(name.startswith(("AWS_", "S3_")) for name in runtime_env)
    assert runtime_env["FORKLESS_MODEL_URI"] == "file:///mnt/models"
    assert pod["serviceAccountName"] == "sa"
