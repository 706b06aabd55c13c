"""The same TorchScript file served by KServe 0.21's Python ModelServer (runs in its own venv).

`--lazy` loads the model in each worker on first use (the best working multi-worker setup found;
`--workers 2` with the model loaded in `load()` crashes at start-up: TorchScript cannot be
pickled to the spawned children). `--torch_threads N` sets torch's threads per process.
"""

from __future__ import annotations

import argparse
import uuid

import torch
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server


class TorchScriptModel(Model):
    def __init__(self, name: str, path: str, lazy: bool, threads: int) -> None:
        super().__init__(name)
        self.path, self.threads, self.module = path, threads, None
        if lazy:
            self.ready = True  # each worker loads on its first request

    def load(self) -> bool:
        if self.threads:
            torch.set_num_threads(self.threads)
        self.module = torch.jit.load(self.path)
        self.ready = True
        return True

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        if self.module is None:
            self.load()
        x = payload.inputs[0].as_numpy()
        with torch.inference_mode():
            y = self.module(torch.from_numpy(x)).numpy()
        output = InferOutput(name="output-0", shape=list(y.shape), datatype="FP32")
        output.set_data_from_numpy(y, binary_data=False)
        return InferResponse(model_name=self.name, infer_outputs=[output], response_id=payload.id or str(uuid.uuid4()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--lazy", action="store_true")
    parser.add_argument("--torch_threads", type=int, default=0)
    args, _ = parser.parse_known_args()
    model = TorchScriptModel(args.model_name, args.model_path, args.lazy, args.torch_threads)
    if not args.lazy:
        model.load()
    ModelServer(workers=int(args.workers), enable_grpc=False,
                enable_latency_logging=str(args.enable_latency_logging).lower() == "true").start([model])
