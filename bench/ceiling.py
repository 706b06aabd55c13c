"""The front-end ceiling: a minimal raw ASGI endpoint (uvicorn + uvloop + httptools, orjson, numpy)
that decodes a V2 JSON body into an array and answers, with no model. `/trivial` answers without
decoding: the load generator's own ceiling. Run: python bench/ceiling.py PORT
"""

from __future__ import annotations

import sys

import numpy as np
import orjson
import uvicorn

ANSWER = orjson.dumps({"model_name": "ceiling", "outputs": [
    {"name": "output-0", "datatype": "FP32", "shape": [1, 3], "data": [0.0, 0.0, 0.0]}]})


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if scope["path"] != "/trivial":
        tensor = orjson.loads(body)["inputs"][0]
        np.array(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]})
    await send({"type": "http.response.body", "body": ANSWER})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools",
                access_log=False, log_level="warning")
