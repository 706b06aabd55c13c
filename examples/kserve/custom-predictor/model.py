"""A KServe custom predictor in the shape of KServe's own sample (custom_model/model.py): an image
classifier answering V1 `{"instances": [{"image": {"b64": ...}}]}` and V2 requests, written against
the `kserve` package only. forkless serves this file unmodified (`model.format: kserve`,
`handler: model:ImageClassifier`), each worker constructing its own instance.

Unlike the sample (torchvision's AlexNet, downloaded), the model is a TorchScript file in the
model directory (`--model_dir`, /mnt/models by default, as KServe's storage initializer fills
it), so it runs offline; `make_model.py` writes one. With KServe's own server, `--workers 2`
fails at start-up for TorchScript; under forkless every worker loads it itself.
"""

import argparse
import base64
import io
import os
import time
from typing import Dict, Union

import numpy as np
import torch
from PIL import Image

from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server
from kserve.errors import InvalidInput
from kserve.utils.utils import generate_uuid

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SIZE = 32


class ImageClassifier(Model):
    def __init__(self, name: str):
        super().__init__(name, return_response_headers=True)
        self.name = name
        self.model = None
        self.ready = False

    def load(self):
        self.model = torch.jit.load(os.path.join(args.model_dir, "model.pt"))
        self.model.eval()
        self.ready = True

    def preprocess(self, payload: Union[Dict, InferRequest], headers: Dict[str, str] = None) -> torch.Tensor:
        if isinstance(payload, dict) and "instances" in payload:
            headers["request-type"] = "v1"
            try:
                images = [base64.b64decode(i["image"]["b64"]) for i in payload["instances"]]
            except (KeyError, TypeError) as exc:
                raise InvalidInput(f"each instance needs image.b64: {exc}")
        elif isinstance(payload, InferRequest):
            # JSON carries BYTES elements as text (base64 here); gRPC and the binary extension as raw bytes.
            images = [b if isinstance(b, bytes) else base64.b64decode(b) for b in payload.inputs[0].as_numpy().flat]
        else:
            raise InvalidInput("expected V1 instances or a V2 request")
        return torch.from_numpy(np.stack([to_array(image) for image in images]))

    def predict(self, inputs: torch.Tensor, headers: Dict[str, str] = None,
                response_headers: Dict[str, str] = None) -> Union[Dict, InferResponse]:
        start = time.time()
        top_k = int(headers.get("x-top-k", "3")) if headers else 3
        with torch.no_grad():
            scores = torch.nn.functional.softmax(self.model(inputs), dim=1)
        values, classes = torch.topk(scores, top_k)
        if response_headers is not None:
            response_headers["prediction-time-latency"] = f"{round((time.time() - start) * 1000, 3)}"
            response_headers["x-worker-pid"] = str(os.getpid())
        if headers and headers.get("request-type") == "v1":
            return {"predictions": [{"classes": c, "scores": v} for c, v in zip(classes.tolist(), values.tolist())]}
        outputs = [InferOutput(name="scores", shape=list(values.shape), datatype="FP32", data=values.flatten().tolist()),
                   InferOutput(name="classes", shape=list(classes.shape), datatype="INT64",
                               data=classes.flatten().tolist())]
        return InferResponse(model_name=self.name, infer_outputs=outputs, response_id=generate_uuid())


def to_array(image_bytes: bytes) -> np.ndarray:
    """Decode, resize and normalise one image to 3 x SIZE x SIZE floats."""
    try:
        image = Image.open(io.BytesIO(image_bytes)).convert("RGB").resize((SIZE, SIZE))
    except Exception as exc:
        raise InvalidInput(f"instance is not an image PIL can read ({type(exc).__name__})")
    pixels = (np.asarray(image, dtype=np.float32) / 255.0 - MEAN) / STD
    return pixels.transpose(2, 0, 1).copy()


parser = argparse.ArgumentParser(parents=[model_server.parser])
parser.add_argument("--model_dir", default="/mnt/models", help="directory holding model.pt")
args, _ = parser.parse_known_args()

if __name__ == "__main__":
    model = ImageClassifier(args.model_name)
    model.load()
    ModelServer().start([model])
