"""Real storage servers on this machine for the download tests: moto's S3 API server (with IAM, so a
wrong key gets the 403 a real bucket gives) and a small Hugging Face Hub endpoint that speaks the
four routes huggingface_hub uses. Both are separate processes or threads answering real HTTP."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# Run with moto's own Python (boto3 is there): a user allowed s3:*, its access key, and the buckets.
_MOTO_SETUP = """
import json, sys, boto3
endpoint, buckets = sys.argv[1], sys.argv[2:]
anonymous = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
iam = boto3.client("iam", **anonymous)
iam.create_user(UserName="forkless")
iam.put_user_policy(UserName="forkless", PolicyName="s3", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="forkless")["AccessKey"]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
for bucket in buckets:
    s3.create_bucket(Bucket=bucket)
print(key["AccessKeyId"], key["SecretAccessKey"])
"""


def serve_in_thread(handler: type[http.server.BaseHTTPRequestHandler], bind: str) -> http.server.ThreadingHTTPServer:
    """A threading HTTP server on ``bind`` and a free port, serving from a daemon thread."""
    server = http.server.ThreadingHTTPServer((bind, 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop_server(server: http.server.ThreadingHTTPServer | None) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, deadline_s: float = 30) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@dataclass
class MotoS3:
    """moto_server on ``host``:``port`` that checks signatures (after the setup's own three calls)."""

    host: str = "127.0.0.1"
    port: int = 0
    buckets: tuple[str, ...] = ("models",)
    authenticate: bool = True  # False: unsigned requests pass too (the benchmark's raw curl reads)
    access_key_id: str = ""
    secret_access_key: str = ""
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, bind: str | None = None) -> MotoS3:
        moto_server = subprocess.run([str(REPO / "hack" / "storage-servers.sh")], check=True,
                                     capture_output=True, text=True).stdout.strip()
        self.port = self.port or free_port()
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"} if self.authenticate else dict(os.environ)
        self.process = subprocess.Popen([moto_server, "-H", bind or self.host, "-p", str(self.port)], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_http(f"http://127.0.0.1:{self.port}/moto-api/")
        python = str(Path(moto_server).parent / "python")
        out = subprocess.run([python, "-c", _MOTO_SETUP, f"http://127.0.0.1:{self.port}", *self.buckets],
                             check=True, capture_output=True, text=True).stdout.split()
        self.access_key_id, self.secret_access_key = out
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)

    def store(self, bucket: str = "models") -> Any:
        from obstore.store import S3Store

        return S3Store(bucket, config={"endpoint": f"http://127.0.0.1:{self.port}", "region": "us-east-1",
                                       "access_key_id": self.access_key_id,
                                       "secret_access_key": self.secret_access_key},
                       client_options={"allow_http": True})

    def put(self, key: str, data: bytes | Path, bucket: str = "models") -> None:
        import obstore

        body: Any = data.open("rb") if isinstance(data, Path) else data
        try:
            obstore.put(self.store(bucket), key, body)
        finally:
            if isinstance(data, Path):
                body.close()

    def env(self, secret: str | None = None) -> dict[str, str]:
        """The variables KServe's webhook would give the init container for this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key if secret is None else secret,
            "S3_ENDPOINT": f"127.0.0.1:{self.port}",
            "S3_USE_HTTPS": "0",
            "AWS_DEFAULT_REGION": "us-east-1",
        }


@dataclass
class FakeHub:
    """A Hugging Face Hub endpoint for ``HF_ENDPOINT``: repositories {owner/name: {path: bytes}} at one
    commit each, the routes snapshot_download uses, and a bearer token when ``token`` is set."""

    repos: Mapping[str, Mapping[str, bytes]]
    token: str | None = None
    requests: list[str] = field(default_factory=list)
    server: http.server.ThreadingHTTPServer | None = None

    @staticmethod
    def commit(repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, value: Any) -> None:
                self._reply(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                hub.requests.append(f"{self.command} {self.path}")
                if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._reply(401, b'{"error": "Invalid credentials in Authorization header"}',
                                       {"X-Error-Code": "RepoNotFound"})
                parts = self.path.split("?", 1)[0].strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
                    repo = "/".join(parts[2:4])
                    if repo not in hub.repos:
                        return self._reply(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
                    files = hub.repos[repo]
                    if parts[4] == "revision":
                        return self._json({"id": repo, "sha": hub.commit(repo),
                                           "siblings": [{"rfilename": name} for name in files]})
                    return self._json([{"type": "file", "path": name, "size": len(data),
                                        "oid": hashlib.sha1(data).hexdigest()} for name, data in files.items()])
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, name = "/".join(parts[:2]), "/".join(parts[4:])
                    data = hub.repos.get(repo, {}).get(name)
                    if data is None:
                        return self._reply(404, b"Entry not found", {"X-Error-Code": "EntryNotFound"})
                    return self._reply(200, data, {"X-Repo-Commit": hub.commit(repo),
                                                   "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                                                   "Content-Type": "application/octet-stream"})
                self._reply(404, b"no such route")

        self.server = serve_in_thread(Handler, "127.0.0.1")
        return self

    def stop(self) -> None:
        stop_server(self.server)


def run_fetch(uri: str, destination: Path, env: Mapping[str, str], timeout_s: float = 60,
              extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``forkless-runtime fetch`` as the init container runs it, in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "forkless_runtime.cli", "fetch", uri, str(destination), *extra],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout_s + 30,
    )


@dataclass
class StalledServer:
    """An HTTP server that announces a large file and then sends a trickle (64 KiB every 0.1 s): the
    stalled download of kserve#5611, which must end at the download timeout instead of hanging."""

    host: str = "127.0.0.1"
    size: int = 1 << 30
    server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://{self.host}:{self.server.server_address[1]}/model.pt"

    def start(self, bind: str | None = None) -> StalledServer:
        size = self.size

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()

            def do_GET(self) -> None:
                self.do_HEAD()
                try:
                    for _ in range(size // (64 << 10)):
                        self.wfile.write(b"\0" * (64 << 10))
                        time.sleep(0.1)
                except OSError:
                    pass  # the client gave up, as it should

        self.server = serve_in_thread(Handler, bind or self.host)
        return self

    def stop(self) -> None:
        stop_server(self.server)


@dataclass
class FakeGcs:
    """fake-gcs-server (a GCS JSON and XML API server) on 127.0.0.1, seeded from a directory whose
    subdirectories are buckets; clients find it through STORAGE_EMULATOR_HOST, as google-cloud-storage
    users point at an emulator."""

    seed: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeGcs:
        binary = subprocess.run([str(REPO / "hack" / "storage-servers.sh"), "fake-gcs"], check=True,
                                capture_output=True, text=True).stdout.strip()
        self.port = self.port or free_port()
        self.process = subprocess.Popen(
            [binary, "-backend", "memory", "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-public-host", f"127.0.0.1:{self.port}", "-data", str(self.seed), "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_http(f"{self.endpoint}/storage/v1/b")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint}
