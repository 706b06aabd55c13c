"""Models from where users keep them: URIs, directories, and `forkless-runtime fetch` against real
servers on this machine (moto's S3 API server with IAM, a Hugging Face Hub endpoint, plain HTTP)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from forkless_runtime.storage.resolve import ModelNotFound, resolve_model_file
from forkless_runtime.storage.uris import InvalidModelUri, parse_model_uri, uri_problem
from forkless_runtime.termination import load_failure_reason, report_termination, termination_message

from tests.runtime.conftest import v2_body
from tests.storage_servers import FakeGcs, FakeHub, MotoS3, StalledServer, run_fetch

# --- URIs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "scheme", "container", "path", "revision"),
    [
        ("s3://models/cnn/model.pt", "s3", "models", "cnn/model.pt", None),
        ("s3://models", "s3", "models", "", None),
        ("s3://my.bucket-1/prefix/", "s3", "my.bucket-1", "prefix/", None),
        ("gs://kfserving-examples/models/torch", "gs", "kfserving-examples", "models/torch", None),
        ("hf://acme/cnn", "hf", "acme/cnn", "", None),
        ("hf://acme/cnn:v1.2", "hf", "acme/cnn", "", "v1.2"),
        ("https://example.com/m/model.onnx?X-Amz-Signature=abc", "https", "example.com", "m/model.onnx?X-Amz-Signature=abc", None),
        ("pvc://claim/dir/model.pt", "pvc", "claim", "dir/model.pt", None),
        ("file:///mnt/models/model.pt", "file", "", "/mnt/models/model.pt", None),
        ("/tmp/model.pt", "file", "", "/tmp/model.pt", None),
    ],
)
def test_model_uris_parse_into_store_container_and_path(uri, scheme, container, path, revision) -> None:
    location = parse_model_uri(uri)
    assert (location.scheme, location.container, location.path, location.revision) == (scheme, container, path, revision)


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("ftp://host/model.pt", "uri must start with s3://"),
        ("s3://", "an s3 uri must be s3://<bucket>"),
        ("s3://Models/key", "an s3 uri must be s3://<bucket>"),
        ("s3://ab/key", "an s3 uri must be s3://<bucket>"),
        ("gs://", "a gs uri must be gs://<bucket>"),
        ("hf://acme", "an hf uri must be hf://<owner>/<repository>"),
        ("hf://acme/cnn/extra", "an hf uri must be hf://<owner>/<repository>"),
        ("hf://acme/cnn:", "an hf uri must be hf://<owner>/<repository>"),
        ("https://example.com/", "an http(s) uri must name one file"),
        ("pvc://Claim/model.pt", "a pvc uri must be pvc://<claim>/<path>"),
        ("file://relative/model.pt", "a file uri must be absolute"),
    ],
)
def test_malformed_uris_are_refused_with_the_form_they_must_have(uri: str, says: str) -> None:
    assert uri_problem(uri) is not None and says in uri_problem(uri)
    with pytest.raises(InvalidModelUri, match="must"):
        parse_model_uri(uri)


# --- directories ----------------------------------------------------------------------------------


def _tree(root: Path, *files: str) -> Path:
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    return root


def test_a_directory_resolves_to_its_one_model_file(tmp_path: Path) -> None:
    root = _tree(tmp_path, "config.json", "README.md", "weights/model.onnx")
    assert resolve_model_file(str(root)) == str(root / "weights" / "model.onnx")
    assert resolve_model_file(str(root / "weights" / "model.onnx")) == str(root / "weights" / "model.onnx")


def test_a_triton_repository_resolves_to_its_highest_version(tmp_path: Path) -> None:
    root = _tree(tmp_path, "cnn/config.pbtxt", "cnn/1/model.pt", "cnn/3/model.pt", "cnn/20/model.pt")
    assert resolve_model_file(str(root)) == str(root / "cnn" / "20" / "model.pt")


@pytest.mark.parametrize(
    ("files", "says"),
    [
        ((), "holds no model file (one of .pt, .ts, .pt2, .onnx); it is empty"),
        (("config.json", "tokenizer.txt"), "holds no model file (one of .pt, .ts, .pt2, .onnx); found: config.json, tokenizer.txt"),
        (("a.pt", "b.onnx"), "holds 2 model files and cannot tell which to serve: found: a.pt, b.onnx"),
        (("cnn/1/model.pt", "mlp/1/model.pt"), "holds 2 model files"),
    ],
)
def test_an_empty_or_ambiguous_directory_fails_listing_what_it_found(tmp_path: Path, files, says: str) -> None:
    root = _tree(tmp_path / "models", *files)
    root.mkdir(exist_ok=True)
    with pytest.raises(ModelNotFound) as error:
        resolve_model_file(str(root))
    assert says in str(error.value)


def test_serve_loads_the_model_a_directory_holds(models: Path, tmp_path: Path, serve) -> None:
    """The init container downloads a prefix into a directory; the runtime finds the model in it."""
    repository = tmp_path / "repository"
    (repository / "mlp" / "1").mkdir(parents=True)
    (repository / "mlp" / "config.pbtxt").write_text("name: 'mlp'\n")
    shutil.copy(models / "mlp.pt", repository / "mlp" / "1" / "model.pt")
    server = serve("--model-name", "mlp", "--model-uri", f"file://{repository}", "--workers", "1")
    response = httpx.post(f"{server.url}/v2/models/mlp/infer", json=v2_body(np.ones((1, 16), np.float32)))
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [1, 3]  # the example MLP: 16 features in, 3 classes out


def test_serve_refuses_an_ambiguous_directory_naming_its_files(models: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    shutil.copy(models / "mlp.pt", tmp_path / "a.pt")
    shutil.copy(models / "mlp.pt", tmp_path / "b.pt")
    result = subprocess.run([sys.executable, "-m", "forkless_runtime.cli", "check", "--model-name", "m",
                             "--model-uri", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "holds 2 model files and cannot tell which to serve: found: a.pt, b.pt" in result.stderr


# --- the termination message ----------------------------------------------------------------------


def test_the_termination_message_carries_the_reason_and_is_written_only_where_the_kubelet_made_the_file(
    tmp_path: Path,
) -> None:
    log = tmp_path / "termination-log"
    assert not report_termination("ModelLoadFailed", "nope", str(log))
    assert not log.exists()
    log.write_text("")
    assert report_termination("ModelLoadFailed", "RuntimeError: bad zip\n", str(log))
    assert log.read_text() == "ModelLoadFailed: RuntimeError: bad zip"
    assert len(termination_message("ModelLoadFailed", "é" * 5000).encode()) <= 4096
    assert load_failure_reason("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB") == "ModelOutOfMemory"
    assert load_failure_reason("RuntimeError: PytorchStreamReader failed reading zip archive") == "ModelLoadFailed"


# --- S3 -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3]:
    server = MotoS3(buckets=("models", "other")).start()
    yield server
    server.stop()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_downloads_one_s3_object_with_kserves_variable_names(s3: MotoS3, tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    s3.put("single/model.pt", data)
    result = run_fetch("s3://models/single/model.pt", tmp_path / "dest", s3.env())
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "dest" / "model.pt").read_bytes() == data
    assert sorted(os.listdir(tmp_path / "dest")) == ["model.pt"]


def test_fetch_downloads_a_prefix_as_a_directory_tree(s3: MotoS3, tmp_path: Path) -> None:
    files = {"repo/cnn/config.pbtxt": b"name: 'cnn'", "repo/cnn/1/model.pt": os.urandom(1 << 20),
             "repo/cnn/2/model.pt": os.urandom(1 << 20)}
    for key, data in files.items():
        s3.put(key, data)
    s3.put("repository-other/model.pt", b"not under the prefix")
    result = run_fetch("s3://models/repo", tmp_path / "dest", s3.env())
    assert result.returncode == 0, result.stderr
    for key, data in files.items():
        assert (tmp_path / "dest" / key.removeprefix("repo/")).read_bytes() == data
    assert not (tmp_path / "dest" / "model.pt").exists()
    assert resolve_model_file(str(tmp_path / "dest")).endswith("cnn/2/model.pt")


@pytest.fixture(scope="module")
def large_object(s3: MotoS3, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """136 MiB in s3://models/large/model.pt: above the size where ranges are considered."""
    big = tmp_path_factory.mktemp("large") / "big.pt"
    with big.open("wb") as out:
        for _ in range(17):
            out.write(os.urandom(8 << 20))
    s3.put("large/model.pt", big)
    return big


def test_a_large_object_from_a_fast_server_is_streamed_whole(s3: MotoS3, large_object: Path, tmp_path: Path) -> None:
    endpoint_url = {"AWS_ENDPOINT_URL": s3.endpoint, **{k: v for k, v in s3.env().items() if not k.startswith("S3_")}}
    result = run_fetch("s3://models/large/model.pt", tmp_path / "dest", endpoint_url)
    assert result.returncode == 0, result.stderr
    assert _digest(tmp_path / "dest" / "model.pt") == _digest(large_object)
    assert "fetched 1 file(s), 136.0 MiB" in result.stderr


def test_a_large_object_read_as_parallel_ranges_is_whole(s3: MotoS3, large_object: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """moto serves one stream faster than ranges, so the choice is forced here to test the ranged path."""
    from forkless_runtime.storage import fetch

    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(fetch, "FAST_STREAM_RATE", float("inf"))
    monkeypatch.setattr(fetch, "PARALLEL_GAIN", 0)
    monkeypatch.setattr(fetch, "PROBE_S", 0)
    reads: list[tuple[int, int]] = []
    read_range = fetch.ObjectStoreSource.read_range
    monkeypatch.setattr(fetch.ObjectStoreSource, "read_range",
                        lambda self, obj, start, end: reads.append((start, end)) or read_range(self, obj, start, end))
    report = fetch.fetch("s3://models/large/model.pt", str(tmp_path / "dest"), timeout_s=120)
    assert report.bytes == large_object.stat().st_size
    assert _digest(tmp_path / "dest" / "model.pt") == _digest(large_object)
    assert len(reads) > 10 and max(end - start for start, end in reads) == fetch.PART_SIZE


def test_a_wrong_secret_fails_at_once_naming_the_403(s3: MotoS3, tmp_path: Path) -> None:
    s3.put("secret/model.pt", b"weights")
    result = run_fetch("s3://models/secret/model.pt", tmp_path / "dest", s3.env(secret="wrong"))
    assert result.returncode == 1
    assert "ModelDownloadFailed: s3://models/secret/model.pt: access denied (403)" in result.stderr
    assert "retrying" not in result.stderr  # a bad key does not heal
    assert not (tmp_path / "dest" / "model.pt").exists()


def test_a_missing_object_fails_naming_the_404(s3: MotoS3, tmp_path: Path) -> None:
    result = run_fetch("s3://models/no/such/model.pt", tmp_path / "dest", s3.env())
    assert result.returncode == 1
    assert "ModelDownloadFailed: s3://models/no/such/model.pt: no object has this key and none is under it (404)" in result.stderr


def test_a_stalled_download_ends_at_its_timeout(tmp_path: Path) -> None:
    stalled = StalledServer().start()
    try:
        result = run_fetch(stalled.url, tmp_path / "dest", {}, extra=("--timeout-s", "1"))
    finally:
        stalled.stop()
    assert result.returncode == 1
    assert f"ModelDownloadFailed: {stalled.url}: the download did not finish within 1s" in result.stderr
    assert not (tmp_path / "dest" / "model.pt").exists()  # never a partial file under the final name


# --- GCS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGcs]:
    seed = tmp_path_factory.mktemp("gcs-seed")
    for name, data in {"models/cnn/config.pbtxt": b"name: 'cnn'", "models/cnn/1/model.pt": os.urandom(2 << 20),
                       "models/mlp.onnx": os.urandom(1 << 20)}.items():
        (seed / name).parent.mkdir(parents=True, exist_ok=True)
        (seed / name).write_bytes(data)
    server = FakeGcs(seed).start()
    yield server
    server.stop()


def test_fetch_downloads_a_gcs_object_and_a_prefix(gcs: FakeGcs, tmp_path: Path) -> None:
    single = run_fetch("gs://models/mlp.onnx", tmp_path / "single", gcs.env())
    assert single.returncode == 0, single.stderr
    assert (tmp_path / "single" / "mlp.onnx").read_bytes() == (gcs.seed / "models" / "mlp.onnx").read_bytes()
    tree = run_fetch("gs://models/cnn", tmp_path / "tree", gcs.env())
    assert tree.returncode == 0, tree.stderr
    assert (tmp_path / "tree" / "1" / "model.pt").read_bytes() == (gcs.seed / "models" / "cnn" / "1" / "model.pt").read_bytes()
    assert resolve_model_file(str(tmp_path / "tree")).endswith("1/model.pt")
    missing = run_fetch("gs://models/nothing/here.pt", tmp_path / "missing", gcs.env())
    assert missing.returncode == 1
    assert "ModelDownloadFailed: gs://models/nothing/here.pt: no object has this key and none is under it (404)" in missing.stderr


# --- Hugging Face ---------------------------------------------------------------------------------


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    server = FakeHub({"acme/cnn": {"model.pt": os.urandom(1 << 20), "config.json": b"{}"}}, token="hf_secret").start()
    yield server
    server.stop()


def test_fetch_downloads_a_hugging_face_repository_with_its_token(hub: FakeHub, tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_secret", "HF_HOME": str(tmp_path / "hf-home")}
    result = run_fetch("hf://acme/cnn:main", tmp_path / "dest", env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "dest" / "model.pt").read_bytes() == hub.repos["acme/cnn"]["model.pt"]
    assert any(request.startswith("GET /api/models/acme/cnn/revision/main") for request in hub.requests)


def test_a_hugging_face_repository_without_the_token_fails_with_the_reason(hub: FakeHub, tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_wrong", "HF_HOME": str(tmp_path / "hf-home")}
    result = run_fetch("hf://acme/cnn", tmp_path / "dest", env)
    assert result.returncode == 1
    assert "ModelDownloadFailed: hf://acme/cnn:" in result.stderr
    assert not (tmp_path / "dest" / "model.pt").exists()


# --- plain HTTP -----------------------------------------------------------------------------------


@pytest.fixture
def http_files(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def test_fetch_streams_an_http_file_and_names_a_404(http_files: tuple[str, Path], tmp_path: Path) -> None:
    url, root = http_files
    data = os.urandom(40 << 20)  # above the parallel threshold, but the server offers no ranges
    (root / "model.onnx").write_bytes(data)
    result = run_fetch(f"{url}/model.onnx", tmp_path / "dest", {})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "dest" / "model.onnx").read_bytes() == data
    missing = run_fetch(f"{url}/missing.onnx", tmp_path / "dest2", {})
    assert missing.returncode == 1
    assert f"ModelDownloadFailed: {url}/missing.onnx: does not exist (404" in missing.stderr


# --- the cache ------------------------------------------------------------------------------------


def test_a_cached_version_is_not_downloaded_again_and_a_new_version_is(s3: MotoS3, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = os.urandom(1 << 20)
    s3.put("cached/model.pt", first)
    result = run_fetch("s3://models/cached/model.pt", tmp_path / "pod-1", s3.env(), extra=("--cache", str(cache)))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "pod-1" / "model.pt").is_symlink()
    assert (tmp_path / "pod-1" / "model.pt").read_bytes() == first
    (entry,) = [path for path in cache.iterdir() if not path.name.startswith(".")]
    cached_at = (entry / "model.pt").stat().st_mtime_ns

    again = run_fetch("s3://models/cached/model.pt", tmp_path / "pod-2", s3.env(), extra=("--cache", str(cache)))
    assert again.returncode == 0, again.stderr
    assert "in the cache" in again.stderr and "nothing downloaded" in again.stderr
    assert (entry / "model.pt").stat().st_mtime_ns == cached_at
    assert resolve_model_file(str(tmp_path / "pod-2")) == str(tmp_path / "pod-2" / "model.pt")

    second = os.urandom(1 << 20)
    s3.put("cached/model.pt", second)  # a new version under the same key: a new ETag
    updated = run_fetch("s3://models/cached/model.pt", tmp_path / "pod-3", s3.env(), extra=("--cache", str(cache)))
    assert updated.returncode == 0, updated.stderr
    assert "fetched 1 file(s)" in updated.stderr
    assert (tmp_path / "pod-3" / "model.pt").read_bytes() == second
    assert len([path for path in cache.iterdir() if not path.name.startswith(".")]) == 2
    assert not [path for path in cache.iterdir() if path.name.startswith(".")]  # no scratch left behind


def test_a_hugging_face_revision_is_cached_by_its_commit(hub: FakeHub, tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_secret", "HF_HOME": str(tmp_path / "hf-home")}
    cache = tmp_path / "cache"
    assert run_fetch("hf://acme/cnn:main", tmp_path / "pod-1", env, extra=("--cache", str(cache))).returncode == 0
    downloads = [request for request in hub.requests if "/resolve/" in request]
    again = run_fetch("hf://acme/cnn:main", tmp_path / "pod-2", env, extra=("--cache", str(cache)))
    assert again.returncode == 0, again.stderr
    assert [request for request in hub.requests if "/resolve/" in request] == downloads  # no file fetched again
    assert (tmp_path / "pod-2" / "model.pt").read_bytes() == hub.repos["acme/cnn"]["model.pt"]
