"""The runtime's fixtures (`models`, `serve`), shared rather than copied: same servers, same example models."""

from tests.runtime.conftest import models, serve

__all__ = ["models", "serve"]
