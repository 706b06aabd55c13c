"""Model loaders, run only inside worker processes (they import torch or onnxruntime).

Each loader returns a `LoadedModel`: a callable from input tensors (numpy) to output tensors
(numpy) plus the metadata the front-end needs: input/output names, datatypes, shapes, and
whether requests may be concatenated along the first dimension.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..precision import precision_problem
from ..protocol import signature as signature_
from ..protocol.tensors import DTYPE_TO_DATATYPE, NamedTensor
from ..settings import HANDLER_PATTERN
from . import precision as precision_

HANDLER_RE = re.compile(HANDLER_PATTERN)


@dataclass
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]  # -1 for a dynamic dimension

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


# inputs, and the request's parameters (handlers that ask for them get them; models ignore them)
Predict = Callable[..., list[NamedTensor]]


@dataclass
class LoadedModel:
    platform: str
    predict: Predict
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    batchable: bool = True
    notes: list[str] = field(default_factory=list)
    precision: str = "fp32"
    warm_up: dict[str, Any] = field(default_factory=dict)  # what the warm-up measured, or why it did not run
    # Where inputs/outputs come from: "model" (the file records them), "declared" (--signature, a
    # config.pbtxt, the handler's class) or "assumed" (TorchScript without one: FP32, any shape).
    signature: str = "model"

    def metadata(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "signature": self.signature,
            "precision": self.precision,
            "warm_up": self.warm_up,
            "inputs": [t.as_dict() for t in self.inputs],
            "outputs": [t.as_dict() for t in self.outputs],
            "batchable": self.batchable,
            "notes": self.notes,
        }


def arrange_inputs(tensors: list[NamedTensor], declared: list[TensorSpec]) -> list[NamedTensor]:
    """Order the request's tensors as the model declares them.

    By name when every name matches; by position otherwise, so a KServe client that calls its
    single input `input-0` works unchanged.
    """
    if not declared:
        return tensors
    if len(tensors) != len(declared):
        raise ValueError(
            f"the model takes {len(declared)} input(s) ({', '.join(t.name for t in declared)}), got {len(tensors)}"
        )
    by_name = {t.name: t for t in tensors}
    if all(spec.name in by_name for spec in declared):
        return [by_name[spec.name] for spec in declared]
    return tensors


def name_outputs(result: Any, declared: list[TensorSpec] | None = None) -> list[NamedTensor]:
    """Tensor, sequence of tensors or dict -> named numpy outputs (`output-0`, ... unless named)."""
    if isinstance(result, dict):
        items = list(result.items())
    elif isinstance(result, list | tuple):
        names = [s.name for s in declared] if declared and len(declared) == len(result) else None
        items = [(names[i] if names else f"output-{i}", value) for i, value in enumerate(result)]
    else:
        name = declared[0].name if declared and len(declared) == 1 else "output-0"
        items = [(name, result)]
    return [NamedTensor(str(name), to_numpy(value)) for name, value in items]


def to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    detach = getattr(value, "detach", None)
    if detach is not None:  # a torch tensor
        return detach().cpu().contiguous().numpy()
    array = np.asarray(value)
    if array.dtype.kind == "U":
        array = np.array([s.encode() for s in array.reshape(-1)], dtype=object).reshape(array.shape)
    return array


def _torch_datatype(dtype: Any) -> str:
    import torch

    sample = torch.empty(0, dtype=dtype)
    try:
        return DTYPE_TO_DATATYPE[sample.numpy().dtype.str]
    except (KeyError, TypeError):
        return ""


NOT_A_PICKLE_LOADER = (
    "forkless never unpickles model files: save the model with torch.jit.save (TorchScript), "
    "torch.export.save (.pt2) or as ONNX, or serve your own code with --format python --handler"
)


def refuse_pickled_checkpoint(path: str, fmt: str) -> None:
    """A torch.save() checkpoint is a pickle: name it for what it is instead of torch's "corrupted file"."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a {fmt} archive (not even a zip file); {NOT_A_PICKLE_LOADER}")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any(name.endswith("/data.pkl") or name == "data.pkl" for name in names) and not any(
        name.endswith(("/constants.pkl", "/archive_format")) for name in names
    ):
        raise ValueError(f"{path} is a torch.save() checkpoint (a pickle), not a {fmt} archive; {NOT_A_PICKLE_LOADER}")


@contextlib.contextmanager
def no_arbitrary_unpickling() -> Iterator[None]:
    """While a .pt2 loads, torch.load is weights-only and plain unpickling is refused.

    torch.export.load unpickles with weights_only=False whatever the archive's configs mark
    `use_pickle`, and pickle.loads "opaque" constants: a crafted .pt2 would run code in the worker.
    Tensors still load (weights-only unpickling takes them); anything else is refused.
    """
    import torch

    real_load = torch.load

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError(f"the archive holds a pickled object; {NOT_A_PICKLE_LOADER}")

    saved = (pickle.load, pickle.loads)
    torch.load = weights_only_load
    pickle.load, pickle.loads = refuse, refuse
    try:
        yield
    finally:
        torch.load = real_load
        pickle.load, pickle.loads = saved


def load_torchscript(path: str, device: str, precision: str = "fp32") -> LoadedModel:
    import torch

    refuse_pickled_checkpoint(path, "TorchScript")
    module = torch.jit.load(path, map_location=device)
    module.eval()
    arguments = [arg.name for arg in module.forward.schema.arguments[1:]]
    # TorchScript records argument names only: FP32 of any shape is assumed until a signature says more.
    inputs = [TensorSpec(name, "FP32", [-1]) for name in arguments]
    notes: list[str] = []
    if precision == "int8":
        module, note = precision_.quantize_torchscript(module)
        notes.append(note)
    model = LoadedModel("pytorch_torchscript", lambda tensors, parameters=None: [], inputs,
                        [TensorSpec("output-0", "FP32", [-1])], notes=notes, precision=precision, signature="assumed")
    model.predict = _torch_predict(module, model, device, precision)
    return model


def load_torch_export(path: str, device: str, precision: str = "fp32") -> LoadedModel:
    import torch

    refuse_pickled_checkpoint(path, "torch.export")
    with no_arbitrary_unpickling():
        program = torch.export.load(path)
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    inputs: list[TensorSpec] = []
    batchable = True
    for name in program.graph_signature.user_inputs:
        value = placeholders[name].meta.get("val") if name in placeholders else None
        if value is None:
            inputs.append(TensorSpec(name, "", [-1]))
            continue
        shape = [d if isinstance(d, int) else -1 for d in value.shape]
        batchable = batchable and bool(shape) and shape[0] == -1
        inputs.append(TensorSpec(name, _torch_datatype(value.dtype), shape))
    outputs: list[TensorSpec] = []
    output_node = next(node for node in program.graph.nodes if node.op == "output")
    user_outputs = set(program.graph_signature.user_outputs)
    for index, arg in enumerate(output_node.args[0]):
        if getattr(arg, "name", None) not in user_outputs:
            continue
        value = arg.meta.get("val")
        shape = [d if isinstance(d, int) else -1 for d in value.shape] if value is not None else [-1]
        datatype = _torch_datatype(value.dtype) if value is not None else ""
        outputs.append(TensorSpec(f"output-{index}", datatype, shape))
    module = program.module().to(device)
    model = LoadedModel("pytorch_export", lambda tensors, parameters=None: [], inputs, outputs, batchable,
                        precision=precision)
    model.predict = _torch_predict(module, model, device, precision)
    if not batchable:
        model.notes.append(
            "exported with a fixed batch dimension: requests run one at a time "
            "(export with dynamic_shapes to let the batcher concatenate them)"
        )
    return model


def _torch_predict(module: Any, model: LoadedModel, device: str, precision: str = "fp32") -> Predict:
    """The model's forward on numpy tensors; reads ``model``'s inputs and outputs at call time, so a
    signature declared after loading orders the inputs and names the outputs."""
    import torch

    call = module
    if precision in precision_.TORCH_DTYPES:
        module = precision_.cast_torch_module(module, precision)
        call = precision_.cast_calls(module, precision)

    def predict(tensors: list[NamedTensor], parameters: dict[str, Any] | None = None) -> list[NamedTensor]:
        ordered = arrange_inputs(tensors, model.inputs)
        with torch.inference_mode():
            args = [torch.from_numpy(t.array).to(device, non_blocking=True) for t in ordered]
            result = call(*args)
        return name_outputs(result, model.outputs)

    return predict


_ORT_TYPES = {
    "tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16", "tensor(bool)": "BOOL",
    "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64",
    "tensor(string)": "BYTES",
}


def load_onnx(path: str, device: str, threads: int, precision: str = "fp32") -> LoadedModel:
    import onnxruntime as ort

    notes: list[str] = []
    if precision == "int8":
        path, note = precision_.quantize_onnx(path)
        notes.append(note)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(path, options, providers=providers)
    if precision == "int8":
        os.unlink(path)  # the quantized copy: the session holds the model now, and a restarted worker makes another

    def spec(arg: Any) -> TensorSpec:
        shape = [d if isinstance(d, int) else -1 for d in arg.shape]
        return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, ""), shape)

    inputs = [spec(a) for a in session.get_inputs()]
    outputs = [spec(a) for a in session.get_outputs()]
    batchable = all(t.shape and t.shape[0] == -1 for t in inputs)
    output_names = [t.name for t in outputs]

    def predict(tensors: list[NamedTensor], parameters: dict[str, Any] | None = None) -> list[NamedTensor]:
        ordered = arrange_inputs(tensors, inputs)
        feed = {s.name: t.array for s, t in zip(inputs, ordered, strict=True)}
        return [NamedTensor(n, np.asarray(v)) for n, v in zip(output_names, session.run(output_names, feed), strict=True)]

    model = LoadedModel("onnxruntime_onnx", predict, inputs, outputs, batchable, notes, precision)
    model.notes.append(f"onnxruntime providers: {', '.join(session.get_providers())}")
    return model


def import_class(path: str) -> type:
    """The class ``package.module:ClassName`` names; any other callable (os:system, os:fork,
    builtins:exit) is refused, since the worker would call it."""
    if not HANDLER_RE.fullmatch(path):
        raise ValueError(f"handler must look like 'package.module:ClassName', got {path!r}")
    module_name, class_name = path.split(":")
    module = importlib.import_module(module_name)
    handler = getattr(module, class_name, None)
    if handler is None:
        raise ValueError(f"module {module_name!r} has no class {class_name!r}")
    if not inspect.isclass(handler):
        raise ValueError(f"handler {path!r} must name a class")
    return handler


def import_handler(path: str) -> type:
    handler = import_class(path)
    if not callable(getattr(handler, "predict", None)):
        raise ValueError(f"handler {path!r} must name a class with a predict(inputs) method")
    return handler


def load_python(handler: str, model_path: str, device: str, precision: str = "fp32") -> LoadedModel:
    """A user class with `load()` and `predict(inputs)`, sync or async; inputs is {name: ndarray}.

    Its constructor gets what it names of model_path, device and precision; a precision other than
    fp32 needs a handler that takes it (only the handler knows how to cast its model)."""
    cls = import_handler(handler)
    kwargs: dict[str, Any] = {}
    init_params = inspect.signature(cls).parameters
    if "model_path" in init_params:
        kwargs["model_path"] = model_path
    if "device" in init_params:
        kwargs["device"] = device
    if "precision" in init_params:
        kwargs["precision"] = precision
    elif precision != "fp32":
        raise ValueError(f"precision {precision}: the handler {handler} takes no precision argument, so it cannot "
                         "apply it; add a `precision` parameter to its __init__ and cast its model in load()")
    instance = cls(**kwargs)
    loop = asyncio.new_event_loop()

    def call(fn: Callable[..., Any], *args: Any) -> Any:
        result = fn(*args)
        return loop.run_until_complete(result) if inspect.isawaitable(result) else result

    if hasattr(instance, "load"):
        call(instance.load)
    declared_in = [_handler_tensor(t) for t in getattr(cls, "inputs", [])]
    declared_out = [_handler_tensor(t) for t in getattr(cls, "outputs", [])]
    model = LoadedModel("python", lambda tensors, parameters=None: [], declared_in, declared_out,
                        bool(getattr(cls, "batchable", True)), precision=precision,
                        signature="declared" if declared_in else "assumed")
    takes = len(inspect.signature(instance.predict).parameters)  # predict(inputs[, parameters[, tensor_parameters]])

    def predict(tensors: list[NamedTensor], parameters: dict[str, Any] | None = None) -> list[NamedTensor]:
        ordered = arrange_inputs(tensors, model.inputs)
        names = [s.name for s in model.inputs] if model.inputs else [t.name for t in ordered]
        request_parameters = dict((parameters or {}).get("request", {}))
        arguments: list[Any] = [{n: t.array for n, t in zip(names, ordered, strict=True)}]
        if takes >= 2:
            arguments.append(request_parameters)
        if takes >= 3:
            tensor_parameters = (parameters or {}).get("inputs", {})
            arguments.append({n: tensor_parameters.get(t.name, {}) for n, t in zip(names, ordered, strict=True)})
        return name_outputs(call(instance.predict, *arguments), model.outputs)

    model.predict = predict
    return model


def _handler_tensor(declared: Any) -> TensorSpec:
    """A handler's `inputs`/`outputs` entry: a name (FP32, any shape) or {name, datatype, shape}."""
    if isinstance(declared, dict):
        return TensorSpec(declared["name"], declared.get("datatype") or "FP32", list(declared.get("shape", [-1])))
    return TensorSpec(str(declared), "FP32", [-1])


def load_model(fmt: str, model_path: str, handler: str | None, device: str, threads: int,
               precision: str = "fp32", signature: str | None = None, name: str = "model") -> LoadedModel:
    problem = precision_problem(precision, device, fmt)
    if problem:
        raise ValueError(problem)
    declared = signature_.load(signature) if signature else None  # a bad file fails before the model loads
    if fmt == "torchscript":
        model = load_torchscript(model_path, device, precision)
    elif fmt == "torch-export":
        model = load_torch_export(model_path, device, precision)
    elif fmt == "onnx":
        model = load_onnx(model_path, device, threads, precision)
    elif fmt == "python":
        if not handler:
            raise ValueError("format 'python' needs a handler (module:Class)")
        model = load_python(handler, model_path, device, precision)
    elif fmt == "kserve":
        if not handler:
            raise ValueError("format 'kserve' needs a handler (module:Class, a kserve.Model subclass)")
        if precision != "fp32":
            raise ValueError(f"precision {precision} is not applied to KServe models: cast the model in its load()")
        from .kserve_model import load_kserve

        model = load_kserve(handler, model_path, name)
    else:
        raise ValueError(f"unknown model format {fmt!r}")
    if declared is not None:
        apply_signature(model, declared)
    elif model.signature == "assumed" and model.inputs:
        model.notes.append(f"{model.platform} records no datatypes or shapes: FP32 of any shape is assumed; "
                           "declare the signature (--signature, or a config.pbtxt beside the model) to have "
                           "requests checked")
    return model


def apply_signature(model: LoadedModel, declared: dict[str, Any]) -> None:
    """The user's signature replaces what the format recorded; its input count must match the model's."""
    inputs = [TensorSpec(t["name"], t["datatype"], t["shape"]) for t in declared["inputs"]]
    if model.inputs and model.platform != "python" and len(inputs) != len(model.inputs):
        raise ValueError(f"the signature declares {len(inputs)} input(s) but the model takes {len(model.inputs)} "
                         f"({', '.join(t.name for t in model.inputs)})")
    model.inputs = inputs
    if declared["outputs"]:
        model.outputs = [TensorSpec(t["name"], t["datatype"], t["shape"]) for t in declared["outputs"]]
    if not all(t.shape and t.shape[0] == -1 for t in inputs):
        model.batchable = False  # a fixed first dimension: requests cannot be concatenated
    model.signature = "declared"
