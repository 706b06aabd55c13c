"""Model files never run code: a pickle with a payload is refused with a clear error, not executed.

TorchScript and ONNX are not pickles (TorchScript's own unpickler takes only TorchScript types);
torch.export.load would unpickle whatever a .pt2 marks `use_pickle`, so the loader makes it
weights-only. A python handler is code by design: the user opts in by naming it, and only a class
with predict() is accepted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from forkless_runtime.worker.loaders import import_handler

PAYLOAD = '''
import os, sys, torch

class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[1],))

torch.save({"model": Payload()}, sys.argv[2])
'''


def write_payload(marker: Path, target: Path) -> None:
    """A torch.save() checkpoint whose unpickling runs `touch marker` (written in a child: no import here)."""
    subprocess.run([sys.executable, "-c", PAYLOAD, str(marker), str(target)], check=True, capture_output=True)


def pt2_with_pickled_weight(source: Path, payload: Path, target: Path) -> None:
    """A valid .pt2 whose config says one weight is pickled, and that weight is the payload."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for info in archive.infolist():
            data = archive.read(info)
            if info.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                config["config"]["hidden.bias"]["use_pickle"] = True
                data = json.dumps(config).encode()
            elif info.filename.endswith("/weights/weight_1"):
                data = payload.read_bytes()
            out.writestr(info, data)


def serve_until_exit(serve, *args: str) -> tuple[int, str]:
    server = serve("--model-name", "evil", *args, "--max-load-attempts", "1", wait=False)
    try:
        code = server.process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not refuse the model:\n{server.log()[-3000:]}")
    return code, server.log()


@pytest.mark.parametrize(("fmt", "suffix"), [("torchscript", ".pt"), ("torch-export", ".pt2")])
def test_a_torch_save_pickle_is_refused_not_executed(serve, tmp_path, fmt, suffix):
    marker = tmp_path / "payload-ran"
    model = tmp_path / f"checkpoint{suffix}"
    write_payload(marker, model)
    code, log = serve_until_exit(serve, "--model-uri", str(model), "--format", fmt)
    assert not marker.exists(), "loading the model file ran the pickle's payload"
    assert code == 1
    assert "torch.save() checkpoint (a pickle)" in log and "never unpickles model files" in log


def test_a_pt2_with_a_pickled_weight_is_refused_not_executed(serve, models, tmp_path):
    marker = tmp_path / "payload-ran"
    payload = tmp_path / "payload.pt"
    write_payload(marker, payload)
    model = tmp_path / "crafted.pt2"
    pt2_with_pickled_weight(models / "mlp.pt2", payload, model)
    code, log = serve_until_exit(serve, "--model-uri", str(model))
    assert not marker.exists(), "torch.export.load ran the pickled weight's payload"
    assert code == 1
    assert "Weights only load failed" in log or "never unpickles" in log


def test_the_genuine_models_still_load(serve, models):
    for name in ("mlp.pt", "mlp.pt2"):
        server = serve("--model-name", "mlp", "--model-uri", str(models / name))
        answer = server.client.post("/v2/models/mlp/infer", json={"inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}]})
        assert answer.status_code == 200, answer.text
        server.stop()


@pytest.mark.parametrize("path", ["os:system", "os:fork", "builtins:exit", "subprocess:check_call", "builtins:object",
                                  "../x:Y", "/etc/passwd:X", "os.path:join", "x:Y:Z", "handlers:Doubler()", "os: system"])
def test_a_handler_path_that_is_not_a_handler_class_is_refused(path):
    sys.path.insert(0, str(Path(__file__).parent.parent / "runtime"))
    try:
        with pytest.raises(ValueError, match="handler"):
            import_handler(path)
    finally:
        sys.path.pop(0)


def test_a_handler_class_is_accepted():
    sys.path.insert(0, str(Path(__file__).parent.parent / "runtime"))
    try:
        assert import_handler("handlers:Doubler").__name__ == "Doubler"
    finally:
        sys.path.pop(0)


def test_the_server_refuses_os_system_as_a_handler_and_says_why(serve, tmp_path):
    marker = tmp_path / "never"
    code, log = serve_until_exit(serve, "--format", "python", "--handler", "os:system",
                                 "--model-uri", f"touch {marker}")
    assert code == 1 and not marker.exists()
    assert "handler 'os:system' must name a class" in log


def test_the_onnx_loader_takes_no_pickle(serve, tmp_path):
    marker = tmp_path / "payload-ran"
    model = tmp_path / "checkpoint.onnx"
    write_payload(marker, model)
    code, log = serve_until_exit(serve, "--model-uri", str(model))
    assert code == 1 and not marker.exists()
    assert "INVALID_PROTOBUF" in log or "onnx" in log.lower()
