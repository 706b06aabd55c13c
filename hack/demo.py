#!/usr/bin/env python3
"""`make run`: the whole system on this machine, or the chart on the cluster KUBECONFIG names.

Without KUBECONFIG (no cluster configured), each step is shown as it runs:
  1. start the local control plane (hack/cluster.sh up, state in .cluster/),
  2. install the CRDs (kubectl apply --server-side -f crds/),
  3. run the operator (forkless-operator run --all-namespaces; log in .cluster/operator.log),
  4. build the example models into .models/,
  5. apply the CPU example with its model URI pointing at .models/mlp.pt,
  6. start the runtime locally exactly as the Deployment the operator rendered runs it: its
     container's command and env, read back from the cluster, with FORKLESS_HOST/FORKLESS_PORT
     set to a free loopback port (the simulated nodes run no containers),
  7. wait for the InferenceService to be Ready and for the local runtime's /v2/health/ready,
  8. send a V2 inference request and print the answer, then `kubectl get fisvc -A`,
  9. stop the local runtime and the operator. The cluster keeps running: hack/cluster.sh down stops it.

With KUBECONFIG set: `helm upgrade --install` of charts/forkless into forkless-system (CRDs
included), then the CPU example applied as it is, and how to watch it become Ready.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".cluster"
MODELS = ROOT / ".models"
BIN = Path(sys.executable).parent
EXAMPLE = ROOT / "examples" / "mlp-cpu.yaml"
NAME = "mlp-cpu"
NAMESPACE = "default"
ISVC = "inferenceservices.serving.forkless.dev"
CHART_NAMESPACE = "forkless-system"
READY_TIMEOUT_S = 180

T = TypeVar("T")


class DemoError(RuntimeError):
    pass


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def tool(name: str) -> str:
    """A binary from .tools/bin (hack/tools.sh builds them), else from PATH."""
    local = ROOT / ".tools" / "bin" / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise DemoError(f"{name} not found in .tools/bin or on PATH (hack/tools.sh builds it)")
    return found


def run(*command: str, env: dict[str, str] | None = None, input: str | None = None, quiet: bool = False) -> str:
    result = subprocess.run(command, env=env, input=input, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise DemoError(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr.strip()}")
    if not quiet and result.stdout.strip():
        print(result.stdout.rstrip(), flush=True)
    return result.stdout


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def background(command: list[str], log: Path, env: dict[str, str], what: str) -> Iterator[subprocess.Popen[bytes]]:
    """A process running while the block runs, its output in ``log``; SIGTERM (then SIGKILL) after."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield process
    finally:
        step(f"stopping {what} (pid {process.pid})")
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        print(f"    exited {process.returncode}; log: {log.relative_to(ROOT)}", flush=True)


# --- the local demo -------------------------------------------------------------------------------


class Cluster:
    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig
        self.kubectl_path = tool("kubectl")
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig)}

    def kubectl(self, *args: str, input: str | None = None, quiet: bool = False) -> str:
        return run(self.kubectl_path, *args, env=self.env, input=input, quiet=quiet)

    def get(self, *args: str) -> dict[str, Any] | None:
        result = subprocess.run([self.kubectl_path, "get", *args, "-o", "json"], env=self.env,
                                capture_output=True, text=True, check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None


def ready_condition(body: dict[str, Any] | None) -> dict[str, Any] | None:
    for condition in (body or {}).get("status", {}).get("conditions", []):
        if condition["type"] == "Ready":
            return dict(condition)
    return None


def local_runtime_command(deployment: dict[str, Any], port: int) -> tuple[list[str], dict[str, str]]:
    """The runtime container's command and env from the Deployment, listening on 127.0.0.1:``port``."""
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "runtime"]
    env: dict[str, str] = {}
    for variable in container.get("env", []):
        if "value" not in variable:
            raise DemoError(f"env {variable['name']} comes from a reference, which this demo cannot resolve")
        env[variable["name"]] = variable["value"]
    env.update(FORKLESS_HOST="127.0.0.1", FORKLESS_PORT=str(port))
    # The image's PATH finds forkless-runtime; here this virtualenv's bin does.
    base = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": os.environ.get("HOME", "/tmp")}
    return list(container["command"]) + list(container.get("args", [])), {**base, **env}


def local_demo() -> None:
    step("starting the local control plane: hack/cluster.sh up (state in .cluster/)")
    out = run(str(ROOT / "hack" / "cluster.sh"), "up", env={**os.environ, "FORKLESS_CLUSTER_DIR": str(STATE)},
              quiet=True)
    print(f"    {out.strip()}", flush=True)
    cluster = Cluster(STATE / "kubeconfig")

    step("installing the CRDs: kubectl apply --server-side -f crds/")
    cluster.kubectl("apply", "--server-side", "--field-manager=forkless-demo", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{ISVC}")

    step("starting the operator: forkless-operator run --all-namespaces (log: .cluster/operator.log)")
    operator_command = [str(BIN / "forkless-operator"), "run", "--all-namespaces", "--metrics-port", "0",
                        "--log-format", "plain"]
    with background(operator_command, STATE / "operator.log", cluster.env, "the operator") as operator:
        step("building the example models into .models/")
        run(sys.executable, "-m", "forkless_runtime.example_models", str(MODELS))
        model = MODELS / "mlp.pt"

        body = yaml.safe_load(EXAMPLE.read_text())
        body["spec"]["model"]["uri"] = model.as_uri()
        step(f"applying InferenceService {NAMESPACE}/{NAME} (examples/mlp-cpu.yaml, model uri {model.as_uri()})")
        cluster.kubectl("apply", "--server-side", "--field-manager=forkless-demo", "-n", NAMESPACE, "-f", "-",
                        input=yaml.safe_dump(body))

        step(f"waiting for the operator to create Deployment {NAMESPACE}/{NAME}")

        def rendered() -> dict[str, Any] | None:
            if operator.poll() is not None:
                raise DemoError(f"the operator exited {operator.returncode}; see .cluster/operator.log")
            return cluster.get("deployment", NAME, "-n", NAMESPACE)

        deployment = wait_for(rendered, 60, f"Deployment {NAME}")
        port = free_port()
        command, env = local_runtime_command(deployment, port)
        settings = " ".join(f"{k}={v}" for k, v in env.items() if k.startswith("FORKLESS_"))
        step(f"starting the runtime locally as the Deployment runs it: {' '.join(command)}")
        print(f"    with {settings}", flush=True)
        command[0] = shutil.which(command[0], path=env["PATH"]) or command[0]
        with background(command, STATE / f"runtime-{NAME}.log", env, "the local runtime") as runtime:
            step(f"waiting for InferenceService {NAME} Ready (kwok runs its pod) and the runtime's /v2/health/ready")

            def isvc_ready() -> dict[str, Any] | None:
                condition = ready_condition(cluster.get(ISVC, NAME, "-n", NAMESPACE))
                return condition if condition and condition["status"] == "True" else None

            condition = wait_for(isvc_ready, READY_TIMEOUT_S, f"InferenceService {NAME} Ready")
            print(f"    InferenceService Ready: {condition['reason']}: {condition['message']}", flush=True)
            base = f"http://127.0.0.1:{port}"

            def runtime_ready() -> bool:
                if runtime.poll() is not None:
                    raise DemoError(f"the runtime exited {runtime.returncode}; see .cluster/runtime-{NAME}.log")
                try:
                    return http("GET", f"{base}/v2/health/ready")[0] == 200
                except OSError:
                    return False

            wait_for(runtime_ready, READY_TIMEOUT_S, "the local runtime's /v2/health/ready")
            print(f"    runtime ready on {base}", flush=True)

            model_name = env["FORKLESS_MODEL_NAME"]
            request = {"inputs": [{"name": "input-0", "shape": [1, 16], "datatype": "FP32",
                                   "data": [round(0.1 * i, 1) for i in range(16)]}]}
            step(f"POST {base}/v2/models/{model_name}/infer")
            print(f"    request: {json.dumps(request)}", flush=True)
            status, answer = http("POST", f"{base}/v2/models/{model_name}/infer", request)
            print(f"    answer ({status}): {json.dumps(answer)}", flush=True)
            if status != 200:
                raise DemoError(f"inference answered {status}")

            step("kubectl get fisvc -A")
            cluster.kubectl("get", "fisvc", "-A")

    print(flush=True)
    print("The cluster is still running:", flush=True)
    print(f"  export KUBECONFIG={STATE / 'kubeconfig'}", flush=True)
    print(f"  {cluster.kubectl_path} get fisvc,deploy,pods -A", flush=True)
    print("Stop it with: hack/cluster.sh down", flush=True)


# --- an existing cluster --------------------------------------------------------------------------


def cluster_install(kubeconfig: str) -> None:
    helm, kubectl = tool("helm"), tool("kubectl")
    step(f"KUBECONFIG={kubeconfig}: installing the chart there")
    step(f"helm upgrade --install forkless charts/forkless -n {CHART_NAMESPACE} --create-namespace --wait")
    run(helm, "upgrade", "--install", "forkless", str(ROOT / "charts" / "forkless"), "-n", CHART_NAMESPACE,
        "--create-namespace", "--wait")
    step(f"kubectl apply -n {NAMESPACE} -f examples/mlp-cpu.yaml (its model is expected in the runtime image)")
    run(kubectl, "apply", "-n", NAMESPACE, "-f", str(EXAMPLE))
    step("watch it become Ready:")
    print(f"    kubectl -n {NAMESPACE} get fisvc {NAME} --watch", flush=True)
    print(f"    kubectl -n {NAMESPACE} wait fisvc/{NAME} --for=condition=Ready --timeout=10m", flush=True)


def main() -> int:
    kubeconfig = os.environ.get("KUBECONFIG")
    try:
        if kubeconfig:
            cluster_install(kubeconfig)
        else:
            local_demo()
    except DemoError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
