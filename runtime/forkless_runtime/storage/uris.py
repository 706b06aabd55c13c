"""Model URIs, parsed without I/O: which store, which bucket or repository, which key or revision.

The patterns are the contract with the CRD: forkless_operator.spec declares its CEL rules from
them, so a URI the API server admits is one this module parses, and the messages are the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

SCHEMES = ("s3", "gs", "hf", "http", "https", "pvc", "file")
# Schemes an init container downloads; pvc and file are mounted or already in the image.
DOWNLOADED_SCHEMES = ("s3", "gs", "hf", "http", "https")

# Bucket names as S3 (3-63 characters, lower case, digits, dots, dashes) and GCS (also underscores,
# up to 222 with dots) accept them; the key may be empty (the whole bucket) or a prefix.
S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"
GS_URI_PATTERN = r"^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/.*)?$"
# KServe's form: hf://owner/repo with an optional :revision (a branch, tag or commit).
HF_URI_PATTERN = r"^hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(:[A-Za-z0-9][A-Za-z0-9._/-]*)?$"
PVC_URI_PATTERN = r"^pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[^/].*$"
# No backslashes in any pattern: the CRD's CEL rules carry them verbatim in string literals.
HTTP_URI_PATTERN = r"^https?://[^/?# ]+/[^?# ]*[^/?# ]([?][^# ]*)?$"

SCHEME_MESSAGE = "uri must start with s3://, gs://, hf://, https://, http://, pvc:// or file://"
S3_MESSAGE = "an s3 uri must be s3://<bucket>[/<key or prefix>], the bucket 3-63 lower-case letters, digits, dots or dashes"
GS_MESSAGE = "a gs uri must be gs://<bucket>[/<object or prefix>], the bucket lower-case letters, digits, dots, dashes or underscores"
HF_MESSAGE = "an hf uri must be hf://<owner>/<repository>[:<revision>]"
PVC_MESSAGE = "a pvc uri must be pvc://<claim>/<path>, with the claim name in lower case"
FILE_MESSAGE = "a file uri must be absolute: file:///<path>"
HTTP_MESSAGE = "an http(s) uri must name one file: http(s)://<host>/<path to the file>"

# (scheme prefix, pattern, message): every rule a URI of that scheme must pass.
RULES: tuple[tuple[str, str, str], ...] = (
    ("s3://", S3_URI_PATTERN, S3_MESSAGE),
    ("gs://", GS_URI_PATTERN, GS_MESSAGE),
    ("hf://", HF_URI_PATTERN, HF_MESSAGE),
    ("pvc://", PVC_URI_PATTERN, PVC_MESSAGE),
    ("file://", r"^file:///.*$", FILE_MESSAGE),
    ("http://", HTTP_URI_PATTERN, HTTP_MESSAGE),
    ("https://", HTTP_URI_PATTERN, HTTP_MESSAGE),
)


class InvalidModelUri(ValueError):
    """A URI that no store can serve; the message says what the form must be."""


@dataclass(frozen=True)
class ModelLocation:
    """A parsed model URI.

    ``container`` is the bucket, the Hugging Face repository (owner/name), the claim, or the
    host for http(s); ``path`` is the key or prefix (no leading slash), the path in the claim,
    or the absolute local path for file; ``revision`` is the Hugging Face revision.
    """

    uri: str
    scheme: str
    container: str
    path: str
    revision: str | None = None

    @property
    def downloaded(self) -> bool:
        return self.scheme in DOWNLOADED_SCHEMES


def uri_problem(uri: str) -> str | None:
    """Why ``uri`` is not a model URI forkless accepts, or None."""
    if not uri.startswith(tuple(f"{scheme}://" for scheme in SCHEMES)):
        return SCHEME_MESSAGE
    for prefix, pattern, message in RULES:
        if uri.startswith(prefix) and re.search(pattern, uri) is None:
            return message
    return None


def parse_model_uri(uri: str) -> ModelLocation:
    """The store, container and path of ``uri``; InvalidModelUri with the expected form otherwise.

    A plain path (no scheme) is a local file, as on the runtime's command line.
    """
    if "://" not in uri:
        return ModelLocation(uri, "file", "", uri)
    problem = uri_problem(uri)
    if problem is not None:
        raise InvalidModelUri(f"{uri!r}: {problem}")
    scheme = uri.split("://", 1)[0]
    if scheme == "hf":
        repository, _, revision = uri.removeprefix("hf://").partition(":")
        return ModelLocation(uri, scheme, repository, "", revision or None)
    if scheme == "file":
        return ModelLocation(uri, scheme, "", uri.removeprefix("file://"))
    parts = urlsplit(uri)
    path = parts.path.lstrip("/")
    if parts.query:
        path = f"{path}?{parts.query}"
    return ModelLocation(uri, scheme, parts.netloc, path)
