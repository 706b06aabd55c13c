"""forkless-runtime: a spawn-safe, multi-worker model server.

The front-end process (HTTP, codecs, batching, supervision) never imports torch;
model workers are spawned processes that set their environment, then import torch,
then load the model themselves.
"""

__version__ = "0.1.0"
