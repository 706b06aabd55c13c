#!/usr/bin/env python3
"""The operator at scale: N InferenceServices applied at once on a fresh local cluster.

Measured, from the moment N objects start being applied at once (``--clients`` concurrent
``kubectl apply --server-side``, 8 by default: one kubectl creates them one after the other,
which would measure kubectl's round trips rather than the operator):
- time until every InferenceService is Reconciled (condition True for its generation),
  until every Deployment exists, until every InferenceService is Ready;
- create-to-Deployment latency per object, p50/p99: the Deployment's ADDED event minus the
  InferenceService's ADDED event, both timestamped here by one watch each (the API's
  creationTimestamps have one-second resolution);
- the operator's peak RSS and CPU time (psutil, sampled every 50 ms);
- API requests per InferenceService: the operator logs in as a ServiceAccount, as it does
  in a cluster, and a FlowSchema of its own counts its requests in kube-apiserver's
  ``apiserver_flowcontrol_dispatched_requests_total`` (before/after the burst);
- the floor: ``kubectl apply --server-side`` of the same 3N children (Deployments and both Services, as
  the operator renders them, without owner references) on another fresh cluster, with no
  operator, and the time until those Deployments are Available.

Each run starts its clusters with hack/cluster.sh in its own state directory (the control
plane with the QPS flags hack/cluster.sh sets, and two CPU nodes with enough pod capacity for
the N pods), and stops them at the end. Writes bench/results/operator-latest.{json,md}.

    .venv/bin/python bench/operator_scale.py [--count 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import urllib3
import yaml
from forkless_operator.render import render_children
from forkless_operator.settings import Settings
from forkless_operator.spec import GROUP, PLURAL, VERSION, InferenceService
from kubernetes import client, config, watch

ROOT = Path(__file__).resolve().parent.parent
KUBECTL = ROOT / ".tools" / "bin" / "kubectl"
CLUSTER_SH = ROOT / "hack" / "cluster.sh"
CRD = ROOT / "crds" / "serving.forkless.dev_inferenceservices.yaml"
RESULTS = ROOT / "bench" / "results"
BIN = Path(sys.executable).parent
NAMESPACE = "bench"
OPERATOR_SA = ("forkless-bench", "forkless-operator")  # namespace, name
FLOW_SCHEMA = "forkless-operator-bench"
# ../shared/notes/performance.md: all Reconciled within 1.25x the floor (kubectl applying the same children)
# measured in the same run, peak RSS under 200 MiB, at most 2 status writes per InferenceService.
TARGETS = {"reconciled_over_floor": 1.25, "peak_rss_mib": 200.0, "status_writes_per_isvc": 2.0}


def reconciled_over_floor(operator: dict[str, Any], floor: dict[str, Any]) -> float | None:
    """All Reconciled over the floor's apply, both from the same run; None where either was not measured."""
    reconciled, floor_s = operator["all_reconciled_s"], floor["apply_s"]
    return reconciled / floor_s if reconciled and floor_s else None


def targets_met(operator: dict[str, Any], floor: dict[str, Any]) -> dict[str, bool]:
    ratio = reconciled_over_floor(operator, floor)
    return {
        "reconciled_over_floor": ratio is not None and ratio <= TARGETS["reconciled_over_floor"],
        "peak_rss_mib": operator["operator"]["peak_rss_mib"] < TARGETS["peak_rss_mib"],
        "status_writes_per_isvc": operator["operator"]["status_writes"] / operator["count"]
        <= TARGETS["status_writes_per_isvc"],
    }


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- a cluster of our own -------------------------------------------------------------------------


@dataclass
class Cluster:
    state: Path
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.env = {**os.environ, "FORKLESS_CLUSTER_DIR": str(self.state), "KUBECONFIG": str(self.kubeconfig),
                    # Two untainted nodes: the N runtime pods (and nothing else) land there; no real
                    # node (its kubelet would only add load, and one may already run for another cluster).
                    "FORKLESS_CPU_NODES": "2", "FORKLESS_REAL_NODES": "0"}

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 600) -> str:
        result = subprocess.run([str(KUBECTL), *args], env=self.env, input=input, capture_output=True, text=True,
                                timeout=timeout, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result.stdout

    def apply(self, *objects: dict[str, Any]) -> None:
        manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})
        self.kubectl("apply", "--server-side", "--field-manager=forkless-bench", "-f", "-", input=manifest)

    def apply_concurrently(self, objects: list[dict[str, Any]], clients: int) -> None:
        """Server-side apply ``objects`` split among ``clients`` kubectl processes running at once."""
        chunks = [objects[i::clients] for i in range(clients) if objects[i::clients]]
        processes = [
            subprocess.Popen([str(KUBECTL), "apply", "--server-side", "--field-manager=forkless-bench", "-f", "-"],
                             env=self.env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for _ in chunks
        ]
        for process, chunk in zip(processes, chunks, strict=True):
            assert process.stdin is not None
            process.stdin.write(json.dumps({"apiVersion": "v1", "kind": "List", "items": chunk}).encode())
            process.stdin.close()
        for process in processes:
            process.wait()
            if process.returncode != 0:
                assert process.stderr is not None
                raise RuntimeError(f"kubectl apply exited {process.returncode}: {process.stderr.read().decode()}")

    def api(self, kubeconfig: Path | None = None) -> client.ApiClient:
        return config.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))


@contextmanager
def fresh_cluster(name: str) -> Iterator[Cluster]:
    cluster = Cluster(Path(tempfile.gettempdir()) / f"forkless-bench-{name}-{os.getpid()}")
    log(f"hack/cluster.sh up ({cluster.state})")
    up = subprocess.run([str(CLUSTER_SH), "up"], env=cluster.env, capture_output=True, text=True, check=False)
    if up.returncode != 0:
        raise RuntimeError(f"hack/cluster.sh up exited {up.returncode}:\n{up.stderr[-4000:]}")
    try:
        cluster.kubectl("apply", "--server-side", "-f", str(CRD))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{PLURAL}.{GROUP}")
        cluster.kubectl("create", "namespace", NAMESPACE)
        # Pods are refused (and the ReplicaSet controller backs off) until the default ServiceAccount exists.
        deadline = time.monotonic() + 60
        while not cluster.kubectl("get", "serviceaccounts", "-n", NAMESPACE, "-o", "name").strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no default ServiceAccount in namespace {NAMESPACE} after 60 s")
            time.sleep(0.1)
        yield cluster
    finally:
        log("hack/cluster.sh down")
        subprocess.run([str(CLUSTER_SH), "down"], env=cluster.env, capture_output=True, check=False)


# --- what is applied ------------------------------------------------------------------------------


def inference_service(name: str) -> dict[str, Any]:
    """A small CPU InferenceService, no resource requests: pod capacity alone bounds where they run."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"replicas": 1, "model": {"uri": "file:///models/mlp.pt"}, "runtime": {"workers": 1}},
    }


def inference_services(count: int) -> list[dict[str, Any]]:
    return [inference_service(f"isvc-{i:04d}") for i in range(count)]


def rendered_children(bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Deployments and Services the operator renders for ``bodies`` (both Services: ``{name}`` and
    KServe's ``{name}-predictor``), without owner references."""
    children = []
    for body in bodies:
        isvc = InferenceService.model_validate({**body, "metadata": {**body["metadata"], "uid": "floor"}})
        for child in render_children(isvc, Settings()).values():
            if child is None or child["kind"] not in ("Deployment", "Service"):
                continue
            del child["metadata"]["ownerReferences"]  # no owner exists: the garbage collector would delete them
            children.append(child)
    return children


# --- watching -------------------------------------------------------------------------------------


class Stamps:
    """First time (monotonic) each object reached each milestone, as seen by one watch per kind."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: dict[str, dict[str, float]] = {}
        self.changed = threading.Condition(self.lock)

    def mark(self, milestone: str, name: str, when: float) -> None:
        with self.lock:
            if name not in self.seen.setdefault(milestone, {}):
                self.seen[milestone][name] = when
                self.changed.notify_all()

    def count(self, milestone: str) -> int:
        with self.lock:
            return len(self.seen.get(milestone, {}))

    def wait(self, milestone: str, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.lock:
            while len(self.seen.get(milestone, {})) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
        return True

    def times(self, milestone: str) -> dict[str, float]:
        with self.lock:
            return dict(self.seen.get(milestone, {}))


def _true_for_generation(body: dict[str, Any], kind: str) -> bool:
    generation = body["metadata"].get("generation")
    return any(
        c.get("type") == kind and c.get("status") == "True" and c.get("observedGeneration") == generation
        for c in body.get("status", {}).get("conditions", [])
    )


def _available(body: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Available" and c.get("status") == "True" for c in body.get("status", {}).get("conditions", [])
    )


def start_watch(api: client.ApiClient, group: str, version: str, plural: str, stamps: Stamps,
                milestones: dict[str, Callable[[dict[str, Any]], bool]]) -> watch.Watch:
    """A watch of ``plural`` in the bench namespace in a daemon thread, stamping each milestone once."""
    objects = client.CustomObjectsApi(api)  # dicts, no model classes: cheap to decode, any group works
    stream = watch.Watch()

    def run() -> None:
        # A watch can end or fail (an ERROR event, a dropped connection under load): watch again.
        # The new watch lists everything again as ADDED, and only first times count.
        while not stream._stop:
            try:
                for event in stream.stream(objects.list_namespaced_custom_object, group, version, NAMESPACE,
                                           plural, timeout_seconds=300):
                    now = time.monotonic()
                    body = event["object"]
                    if event["type"] == "ERROR" or "metadata" not in body:
                        log(f"watch of {plural}: {body}")
                        break
                    for milestone, reached in milestones.items():
                        if reached(body):
                            stamps.mark(milestone, body["metadata"]["name"], now)
            except (OSError, urllib3.exceptions.HTTPError, client.ApiException) as error:
                if stream._stop:
                    return
                log(f"watch of {plural} failed ({error}); watching again")
                time.sleep(0.5)

    threading.Thread(target=run, name=f"watch-{plural}", daemon=True).start()
    return stream


def wait_until_watching(cluster: Cluster, stamps: Stamps, milestone: str, probe: dict[str, Any]) -> None:
    """Apply ``probe`` (in the bench namespace) and wait for its event: the watches are live."""
    cluster.apply(probe)
    if not stamps.wait(milestone, 1, 30):
        raise RuntimeError("the watches saw nothing within 30 s")


# --- the operator, as a ServiceAccount --------------------------------------------------------------


def operator_kubeconfig(cluster: Cluster) -> Path:
    """A kubeconfig with a token of the operator's ServiceAccount (bound to cluster-admin)."""
    namespace, name = OPERATOR_SA
    cluster.kubectl("create", "namespace", namespace)
    cluster.kubectl("create", "serviceaccount", name, "-n", namespace)
    cluster.kubectl("create", "clusterrolebinding", "forkless-operator-bench", "--clusterrole=cluster-admin",
                    f"--serviceaccount={namespace}:{name}")
    token = cluster.kubectl("create", "token", name, "-n", namespace, "--duration=6h").strip()
    admin = json.loads(cluster.kubectl("config", "view", "--raw", "-o", "json"))
    server = admin["clusters"][0]["cluster"]
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "bench", "cluster": server}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": name}}],
        "current-context": "bench",
    }
    path = cluster.state / "operator-kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    path.chmod(0o600)
    # Its requests, and only its, are counted under a FlowSchema of their own (same priority
    # level as the default for service accounts).
    cluster.apply({
        "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
        "kind": "FlowSchema",
        "metadata": {"name": FLOW_SCHEMA},
        "spec": {
            "matchingPrecedence": 500,
            "priorityLevelConfiguration": {"name": "workload-low"},
            "distinguisherMethod": {"type": "ByUser"},
            "rules": [{
                "subjects": [{"kind": "ServiceAccount", "serviceAccount": {"name": name, "namespace": namespace}}],
                "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"], "clusterScope": True,
                                   "namespaces": ["*"]}],
                "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
            }],
        },
    })
    return path


def operator_requests(cluster: Cluster) -> int:
    """Requests kube-apiserver has dispatched for the operator's FlowSchema so far."""
    metrics = cluster.kubectl("get", "--raw", "/metrics")
    total = 0
    pattern = re.compile(r'^apiserver_flowcontrol_dispatched_requests_total\{([^}]*)\} (\S+)$')
    for line in metrics.splitlines():
        match = pattern.match(line)
        if match and f'flow_schema="{FLOW_SCHEMA}"' in match.group(1):
            total += int(float(match.group(2)))
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def operator_metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    return values


class Sampler:
    """Peak RSS of a process, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def running_operator(cluster: Cluster, kubeconfig: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    metrics_port, liveness_port = free_port(), free_port()
    command = [str(BIN / "forkless-operator"), "run", "--all-namespaces", "--standalone",
               "--metrics-port", str(metrics_port), "--liveness", f"http://127.0.0.1:{liveness_port}/healthz"]
    log_path = Path(tempfile.gettempdir()) / f"forkless-bench-operator-{os.getpid()}.log"  # outlives the cluster
    log(f"operator log: {log_path}")
    with log_path.open("wb") as out:
        process = subprocess.Popen(command, env={**cluster.env, "KUBECONFIG": str(kubeconfig)}, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{liveness_port}/healthz", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the operator did not come up; see {log_path}") from None
                time.sleep(0.1)
        yield process, metrics_port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- the two runs ---------------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds (user + system) that the control plane's processes and the operator spend in a block."""

    def __init__(self, cluster: Cluster, extra: dict[str, int] | None = None) -> None:
        pids = dict(line.split() for line in (cluster.state / "pids").read_text().splitlines() if line.strip())
        self.processes = {name: psutil.Process(int(pid)) for name, pid in {**pids, **(extra or {})}.items()}
        self.before = self._now()
        self.spent: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        return {name: sum(process.cpu_times()[:2]) for name, process in self.processes.items()}

    def stop(self) -> dict[str, float]:
        after = self._now()
        self.spent = {name: round(after[name] - self.before[name], 1) for name in after}
        return self.spent


def stragglers(cluster: Cluster, ready: set[str], limit: int = 5) -> dict[str, Any]:
    """Why some InferenceServices were not Ready in time: the Ready condition of a few."""
    items = json.loads(cluster.kubectl("get", f"{PLURAL}.{GROUP}", "-n", NAMESPACE, "-o", "json"))["items"]
    late = [i for i in items if i["metadata"]["name"] not in ready]
    return {
        i["metadata"]["name"]: next((c for c in i.get("status", {}).get("conditions", []) if c["type"] == "Ready"), None)
        for i in late[:limit]
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def _seconds(stamps: Stamps, milestone: str, start: float, count: int) -> float | None:
    times = stamps.times(milestone)
    return round(max(times.values()) - start, 3) if len(times) >= count else None


def operator_run(count: int, clients: int, timeout: float, as_admin: bool = False) -> dict[str, Any]:
    bodies = inference_services(count)
    with fresh_cluster("operator") as cluster:
        kubeconfig = cluster.kubeconfig if as_admin else operator_kubeconfig(cluster)
        api = cluster.api()
        stamps = Stamps()
        watches = [
            start_watch(api, GROUP, VERSION, PLURAL, stamps, {
                "created": lambda body: True,
                "reconciled": lambda body: _true_for_generation(body, "Reconciled"),
                "ready": lambda body: _true_for_generation(body, "Ready"),
            }),
            start_watch(api, "apps", "v1", "deployments", stamps, {"deployment": lambda body: True}),
        ]
        with running_operator(cluster, kubeconfig) as (operator, metrics_port), Sampler(operator.pid) as rss:
            wait_until_watching(cluster, stamps, "ready", inference_service("warm-up"))  # watches and operator both live
            process = psutil.Process(operator.pid)
            cpu_before = sum(process.cpu_times()[:2])
            rss_idle = process.memory_info().rss
            requests_before = operator_requests(cluster)
            metrics_before = operator_metrics(metrics_port)
            cpu = CpuMeter(cluster, {"forkless-operator": operator.pid})

            log(f"applying {count} InferenceServices with {clients} concurrent kubectl apply --server-side")
            start = time.monotonic()
            cluster.apply_concurrently(bodies, clients)
            applied_s = time.monotonic() - start
            log(f"applied in {applied_s:.1f}s")
            for milestone in ("reconciled", "deployment", "ready"):
                if not stamps.wait(milestone, count + 1, timeout - (time.monotonic() - start)):
                    log(f"timed out: {stamps.count(milestone) - 1}/{count} {milestone}")
                    break
                log(f"all {milestone} after {time.monotonic() - start:.1f}s")
            cpu.stop()
            late = stragglers(cluster, set(stamps.times("ready"))) if stamps.count("ready") <= count else {}
            requests = operator_requests(cluster) - requests_before
            metrics_after = operator_metrics(metrics_port)
            cpu_s = sum(process.cpu_times()[:2]) - cpu_before
        for stream in watches:
            stream.stop()

    created, deployed = stamps.times("created"), stamps.times("deployment")
    latencies = [deployed[name] - created[name] for name in created if name in deployed and name != "warm-up"]

    def delta(key: str) -> float:
        return metrics_after.get(key, 0.0) - metrics_before.get(key, 0.0)

    return {
        "count": count,
        "clients": clients,
        "apply_s": round(applied_s, 3),
        "all_reconciled_s": _seconds(stamps, "reconciled", start, count + 1),
        "all_deployments_s": _seconds(stamps, "deployment", start, count + 1),
        "all_ready_s": _seconds(stamps, "ready", start, count + 1),
        "cpu_s_by_process": cpu.spent,
        "not_ready_sample": late,
        "reconciled": stamps.count("reconciled") - 1,
        "ready": stamps.count("ready") - 1,
        "create_to_deployment_ms": {
            "p50": round(percentile(latencies, 50) * 1000, 1) if latencies else None,
            "p99": round(percentile(latencies, 99) * 1000, 1) if latencies else None,
            "max": round(max(latencies) * 1000, 1) if latencies else None,
            "mean": round(statistics.fmean(latencies) * 1000, 1) if latencies else None,
        },
        "operator": {
            "peak_rss_mib": round(rss.peak / 2**20, 1),
            "idle_rss_mib": round(rss_idle / 2**20, 1),
            "cpu_s": round(cpu_s, 2),
            "api_requests": requests,
            "api_requests_per_isvc": round(requests / count, 2),
            "reconciles": delta('forkless_operator_reconciles_total{outcome="done"}'),
            "status_writes": delta("forkless_operator_status_writes_total"),
            "errors": {key: delta(key) for key in metrics_after if key.startswith("forkless_operator_errors_total")
                       and delta(key)},
        },
    }


def floor_run(count: int, clients: int, timeout: float) -> dict[str, Any]:
    children = rendered_children(inference_services(count))
    with fresh_cluster("floor") as cluster:
        stamps = Stamps()
        stream = start_watch(cluster.api(), "apps", "v1", "deployments", stamps, {
            "deployment": lambda body: True, "available": _available})
        probe = next(c for c in rendered_children([inference_service("warm-up")]) if c["kind"] == "Deployment")
        wait_until_watching(cluster, stamps, "available", probe)
        log(f"floor: applying {len(children)} Deployments and Services with {clients} concurrent kubectl apply")
        cpu = CpuMeter(cluster)
        start = time.monotonic()
        cluster.apply_concurrently(children, clients)
        applied_s = time.monotonic() - start
        log(f"floor: applied in {applied_s:.1f}s")
        stamps.wait("available", count + 1, timeout)
        cpu.stop()
        stream.stop()
    return {
        "objects": len(children),
        "cpu_s_by_process": cpu.spent,
        "apply_s": round(applied_s, 3),
        "all_available_s": _seconds(stamps, "available", start, count + 1),
    }


# --- reporting ------------------------------------------------------------------------------------


def wait_for_quiet(max_load: float, patience_s: float) -> float:
    """Wait (up to ``patience_s``) for the 1-minute load average to drop below ``max_load``; return it."""
    deadline = time.monotonic() + patience_s
    while (load := os.getloadavg()[0]) >= max_load and time.monotonic() < deadline:
        log(f"1-minute load {load:.2f} >= {max_load}: waiting for a quiet machine")
        time.sleep(15)
    return load


def markdown(result: dict[str, Any]) -> str:
    op, floor = result["operator_run"], result["floor"]
    lat = op["create_to_deployment_ms"]
    verdict = {key: ("met" if ok else "MISSED") for key, ok in result["targets_met"].items()}
    over_floor = reconciled_over_floor(op, floor)
    ratio = f"{over_floor:.2f}x" if over_floor is not None else "not measured"
    return "\n".join([
        f"# Operator at scale: {op['count']} InferenceServices at once",
        "",
        f"{result['date']} on {result['machine']}; 1-minute load {result['load_before']:.2f} before the run.",
        f"All objects applied at once by {op['clients']} concurrent `kubectl apply --server-side` on a fresh local",
        "control plane (hack/cluster.sh),"
        " the operator a subprocess logging in as a ServiceAccount. Times from the start of the apply.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| kubectl apply of the {op['count']} InferenceServices | {op['apply_s']} s |",
        f"| all Reconciled | {op['all_reconciled_s']} s |",
        f"| all Reconciled over the floor's apply (target {TARGETS['reconciled_over_floor']:g}x: "
        f"{verdict['reconciled_over_floor']}) | {ratio} |",
        f"| all Deployments exist | {op['all_deployments_s']} s |",
        f"| all Ready | {op['all_ready_s']} s |",
        f"| create-to-Deployment p50 / p99 / max | {lat['p50']} / {lat['p99']} / {lat['max']} ms |",
        f"| operator peak RSS (target {TARGETS['peak_rss_mib']:g} MiB: {verdict['peak_rss_mib']}) | "
        f"{op['operator']['peak_rss_mib']} MiB (idle {op['operator']['idle_rss_mib']} MiB) |",
        f"| operator CPU time | {op['operator']['cpu_s']} s |",
        f"| API requests by the operator | {op['operator']['api_requests']} "
        f"({op['operator']['api_requests_per_isvc']} per InferenceService) |",
        f"| reconciles / status writes (target {TARGETS['status_writes_per_isvc']:g} per InferenceService: "
        f"{verdict['status_writes_per_isvc']}) | {op['operator']['reconciles']:g} / {op['operator']['status_writes']:g} |",
        f"| operator errors | {op['operator']['errors'] or 'none'} |",
        f"| floor: kubectl apply of {floor['objects']} Deployments + Services | {floor['apply_s']} s |",
        f"| floor: all those Deployments Available | {floor['all_available_s']} s |",
        "",
        "CPU seconds spent from the apply until the last milestone (user + system):",
        "",
        "| process | with the operator | floor |",
        "|---|---|---|",
        *(f"| {name} | {op['cpu_s_by_process'].get(name, '')} | {floor.get('cpu_s_by_process', {}).get(name, '')} |"
          for name in op["cpu_s_by_process"]),
        "",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8, help="kubectl processes creating the objects at once")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for each run to converge")
    parser.add_argument("--max-load", type=float, default=1.0, help="wait for a 1-minute load average below this")
    parser.add_argument("--patience", type=float, default=600, help="seconds to wait for that, then run anyway")
    parser.add_argument("--as-admin", action="store_true",
                        help="run the operator as system:masters (exempt from API Priority and Fairness, as in the "
                        "tests); its requests are then not counted")
    parser.add_argument("--skip-floor", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not KUBECTL.exists():
        subprocess.run([str(ROOT / "hack" / "tools.sh")], check=True)

    load = wait_for_quiet(args.max_load, args.patience)
    operator = operator_run(args.count, args.clients, args.timeout, args.as_admin)
    floor = {"objects": 0, "apply_s": None, "all_available_s": None} if args.skip_floor else floor_run(
        args.count, args.clients, args.timeout)
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {round(psutil.virtual_memory().total / 2**30)} GiB",
        "load_before": round(load, 2),
        "operator_run": operator,
        "floor": floor,
        "targets": TARGETS,
        "targets_met": targets_met(operator, floor),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "operator-latest.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "operator-latest.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if all(result["targets_met"].values()) else 1


if __name__ == "__main__":
    # SIGTERM unwinds like an exception, so that the clusters are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if shutil.which("openssl") is None:
        log("warning: openssl not found; hack/cluster.sh needs it")
    sys.exit(main())
