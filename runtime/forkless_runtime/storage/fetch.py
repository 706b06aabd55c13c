"""`forkless-runtime fetch URI DEST`: download a model into DEST in bounded memory, or fail with why.

Run by the init container of every pod whose model lives in s3://, gs://, hf:// or http(s)://.
Object stores go through obstore (one Rust-backed wheel for S3, GCS and their look-alikes, the
credentials from the environment with AWS's and Google's names); Hugging Face repositories through
huggingface_hub (the Hub's own protocol, tokens and revisions); plain http(s) through the standard
library. Every object is written to ``<name>.part`` and renamed only once its size (and, where the
ETag is an MD5, its digest) checks out, so a file under its final name is always whole. Large
objects are read as one stream or as parallel ranges, whichever the server serves faster (measured
on the object itself), every read pinned to the first ETag (If-Match); either way at most
``readers x part_size`` bytes are in memory. Transient failures are retried with
back-off; a 403, 404 or bad credential is not, since it will not heal. The caller enforces the
total deadline (forkless_runtime.cli) so nothing ever hangs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

from .uris import ModelLocation, parse_model_uri

log = logging.getLogger("forkless.fetch")

PART_SIZE = 8 << 20
# What one read of a stream returns at least: fewer, larger writes.
STREAM_CHUNK = 1 << 20
# Objects at least this large may be read as parallel ranges (_download_large); smaller ones are streamed.
PARALLEL_THRESHOLD = 128 << 20
READERS = 8
# How long a large object is streamed before the probe decides between one stream and ranges, and
# how much faster the ranges must promise to be to be chosen.
PROBE_S = 0.5
PARALLEL_GAIN = 1.5
# A stream this fast is left alone: one init container CPU writing to disk gains little from ranges.
FAST_STREAM_RATE = 256 << 20
RETRIES = 5
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0
_MD5_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})"?$')


class DownloadFailed(Exception):
    """The model cannot be downloaded; the message is what the user sees in status."""


class PermanentFailure(DownloadFailed):
    """A failure a retry cannot fix: forbidden, missing, bad credentials, a failed check."""


@dataclass(frozen=True)
class RemoteObject:
    key: str  # the store's key, or the URL
    name: str  # where it goes, relative to the destination
    size: int  # -1 when the server does not say
    etag: str | None = None
    ranged: bool = True  # whether it can be read as byte ranges

    @property
    def parallel(self) -> bool:
        return self.ranged and self.size >= PARALLEL_THRESHOLD


class Source(Protocol):
    def describe(self) -> str: ...
    def objects(self) -> list[RemoteObject]: ...
    def read_range(self, obj: RemoteObject, start: int, end: int) -> bytes | memoryview: ...
    def stream(self, obj: RemoteObject) -> Iterator[bytes | memoryview]: ...


@dataclass
class FetchReport:
    files: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    cached: bool = False  # served from the cache volume, nothing downloaded

    @property
    def megabytes_per_s(self) -> float:
        return self.bytes / (1 << 20) / self.seconds if self.seconds > 0 else 0.0


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def s3_options() -> tuple[dict[str, Any], dict[str, Any]]:
    """(S3 config, client options) from the environment, with KServe's names as well as AWS's.

    KServe's webhook produces S3_ENDPOINT + S3_USE_HTTPS, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION,
    S3_VERIFY_SSL and awsAnonymousCredential from a Secret's annotations; obstore reads the AWS_*
    names (keys, session token, web identity token file for IRSA) itself.
    """
    config: dict[str, Any] = {}
    client: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint and os.environ.get("S3_ENDPOINT"):
        endpoint = os.environ["S3_ENDPOINT"]
        if "://" not in endpoint:
            endpoint = ("https://" if _flag("S3_USE_HTTPS", True) else "http://") + endpoint
    if endpoint:
        config["endpoint"] = endpoint
        client["allow_http"] = endpoint.startswith("http://")
    config["region"] = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    if _flag("awsAnonymousCredential", False):
        config["skip_signature"] = True
    if not _flag("S3_VERIFY_SSL", True):
        client["allow_invalid_certificates"] = True
    if _flag("S3_USER_VIRTUAL_BUCKET", False):
        config["virtual_hosted_style_request"] = True
    return config, client


def gcs_options() -> tuple[dict[str, Any], dict[str, Any]]:
    """(GCS config, client options): a key file from GOOGLE_APPLICATION_CREDENTIALS (KServe mounts
    gcloud-application-credentials.json there), else the pod's workload identity; an emulator from
    STORAGE_EMULATOR_HOST, as google-cloud-storage reads it."""
    config: dict[str, Any] = {}
    client: dict[str, Any] = {}
    credentials = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if credentials:
        config["application_credentials"] = credentials
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        config["base_url"] = emulator if "://" in emulator else f"http://{emulator}"
        config["skip_signature"] = True
        client["allow_http"] = config["base_url"].startswith("http://")
    return config, client


def _classify(error: BaseException, what: str) -> DownloadFailed:
    """A store's error as a DownloadFailed: permanent when retrying cannot help."""
    from obstore.exceptions import (
        InvalidPathError,
        NotFoundError,
        PermissionDeniedError,
        PreconditionError,
        UnauthenticatedError,
    )

    text = _first_line(str(error))
    if isinstance(error, FileNotFoundError | NotFoundError):
        return PermanentFailure(f"{what} does not exist (404): {text}")
    if isinstance(error, PermissionDeniedError | UnauthenticatedError):
        return PermanentFailure(f"{what}: access denied (403), check the credentials: {text}")
    if isinstance(error, PreconditionError):
        return DownloadFailed(f"{what} changed while it was being downloaded (its ETag moved): {text}")
    if isinstance(error, InvalidPathError):
        return PermanentFailure(f"{what}: {text}")
    for status, meaning in (("403", "access denied (403), check the credentials"),
                            ("401", "not authenticated (401), check the credentials"),
                            ("400", "the store refused the request (400)")):
        if f" {status} " in str(error) or f"status code: {status}" in str(error):
            return PermanentFailure(f"{what}: {meaning}: {_store_error_code(str(error)) or text}")
    return DownloadFailed(f"{what}: {text}")


def _store_error_code(text: str) -> str | None:
    """S3's <Code>SignatureDoesNotMatch</Code> and <Message>, when the body carries them."""
    code = re.search(r"<Code>([^<]+)</Code>", text)
    message = re.search(r"<Message>([^<]+)</Message>", text)
    if code is None:
        return None
    return f"{code.group(1)}: {message.group(1)}" if message else code.group(1)


def _first_line(text: str, limit: int = 400) -> str:
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return line[:limit]


class ObjectStoreSource:
    """An s3:// or gs:// location: one object, or every object under a prefix."""

    def __init__(self, location: ModelLocation) -> None:
        from obstore.store import GCSStore, S3Store

        self.location = location
        # obstore's TypedDicts are not importable at run time; the values follow them.
        retry: Any = {"max_retries": 3, "retry_timeout": _timedelta(60)}
        client_defaults: Any = {"connect_timeout": "10s", "timeout": "300s"}
        config: Any
        client: Any
        if location.scheme == "s3":
            config, client = s3_options()
            self.store: Any = S3Store(location.container, config=config, client_options=client_defaults | client,
                                      retry_config=retry)
        else:
            config, client = gcs_options()
            self.store = GCSStore(location.container, config=config, client_options=client_defaults | client,
                                  retry_config=retry)

    def describe(self) -> str:
        return self.location.uri

    def objects(self) -> list[RemoteObject]:
        import obstore

        prefix = self.location.path
        if prefix and not prefix.endswith("/"):
            try:
                meta = obstore.head(self.store, prefix)
                return [RemoteObject(prefix, os.path.basename(prefix), meta["size"], meta.get("e_tag"))]
            except FileNotFoundError:
                prefix += "/"  # not an object: a directory
            except Exception as error:
                raise _classify(error, self.location.uri) from error
        try:
            listed = [meta for page in obstore.list(self.store, prefix or None) for meta in page]
        except Exception as error:
            raise _classify(error, self.location.uri) from error
        found = [
            RemoteObject(meta["path"], meta["path"][len(prefix):], meta["size"], meta.get("e_tag"))
            for meta in listed
            if not meta["path"].endswith("/") and meta["path"][len(prefix):]
        ]
        if not found:
            raise PermanentFailure(f"{self.location.uri}: no object has this key and none is under it (404)")
        return found

    def read_range(self, obj: RemoteObject, start: int, end: int) -> bytes | memoryview:
        import obstore

        options: dict[str, Any] = {"range": (start, end)}
        if obj.etag:
            options["if_match"] = obj.etag
        return memoryview(obstore.get(self.store, obj.key, options=options).bytes())  # type: ignore[arg-type]

    def stream(self, obj: RemoteObject) -> Iterator[bytes | memoryview]:
        import obstore

        options: dict[str, Any] = {"if_match": obj.etag} if obj.etag else {}
        result = obstore.get(self.store, obj.key, options=options)  # type: ignore[arg-type]
        for chunk in result.stream(min_chunk_size=STREAM_CHUNK):
            yield memoryview(chunk)


def _timedelta(seconds: float) -> Any:
    import datetime

    return datetime.timedelta(seconds=seconds)


class HttpSource:
    """One file over http(s), with the standard library: ranges where the server offers them."""

    def __init__(self, location: ModelLocation) -> None:
        self.location = location
        self.url = location.uri

    def describe(self) -> str:
        return self.url.split("?", 1)[0]  # a presigned URL's query is a credential

    def _open(self, method: str = "GET", headers: dict[str, str] | None = None) -> Any:
        request = urllib.request.Request(self.url, method=method, headers=headers or {})
        try:
            return urllib.request.urlopen(request, timeout=60)
        except urllib.error.HTTPError as error:
            meaning = {401: "not authenticated", 403: "access denied", 404: "does not exist"}.get(error.code)
            failure = PermanentFailure if error.code in (400, 401, 403, 404, 410) else DownloadFailed
            raise failure(f"{self.describe()}: {meaning or 'the server answered'} ({error.code} {error.reason})") from error
        except (urllib.error.URLError, OSError) as error:
            raise DownloadFailed(f"{self.describe()}: {error}") from error

    def objects(self) -> list[RemoteObject]:
        with self._open("HEAD") as response:
            size = int(response.headers.get("Content-Length") or -1)
            ranged = response.headers.get("Accept-Ranges", "").lower() == "bytes"
            etag = response.headers.get("ETag")
        name = os.path.basename(self.location.path.split("?", 1)[0]) or "model"
        return [RemoteObject(self.url, name, size, etag, ranged)]

    def read_range(self, obj: RemoteObject, start: int, end: int) -> bytes | memoryview:
        headers = {"Range": f"bytes={start}-{end - 1}"}
        if obj.etag:
            headers["If-Match"] = obj.etag
        with self._open(headers=headers) as response:
            if response.status != 206:
                raise DownloadFailed(f"{self.describe()}: asked for a range, got status {response.status}")
            return bytes(response.read())

    def stream(self, obj: RemoteObject) -> Iterator[bytes | memoryview]:
        with self._open() as response:
            while chunk := response.read(1 << 20):
                yield chunk


def _retrying(what: str, attempt: Callable[[], Any], deadline: float) -> Any:
    """``attempt()``, retried with exponential back-off on transient failures until the deadline."""
    delay = FIRST_BACKOFF_S
    for tries in range(1, RETRIES + 1):
        try:
            return attempt()
        except PermanentFailure:
            raise
        except Exception as error:
            failure = error if isinstance(error, DownloadFailed) else _classify(error, what)
            if isinstance(failure, PermanentFailure) or tries == RETRIES or time.monotonic() + delay > deadline:
                raise failure from error
            log.warning("%s (attempt %d of %d); retrying in %.1fs", failure, tries, RETRIES, delay)
            time.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)
    raise AssertionError("unreachable")


def _verify(obj: RemoteObject, path: str, size: int, md5: Any | None, what: str) -> None:
    if obj.size >= 0 and size != obj.size:
        raise DownloadFailed(f"{what}: got {size} bytes, the store said {obj.size}")
    match = _MD5_ETAG.match(obj.etag or "")
    if md5 is not None and match and md5.hexdigest() != match.group(1).lower():
        raise PermanentFailure(f"{what}: the MD5 of the bytes received does not match the ETag {obj.etag}")


def _md5_for(obj: RemoteObject) -> Any | None:
    """An MD5 to fill while streaming, when the ETag is one (single-part uploads); else None."""
    return hashlib.md5(usedforsecurity=False) if _MD5_ETAG.match(obj.etag or "") else None


def _download_streamed(source: Source, obj: RemoteObject, part: str, deadline: float) -> None:
    what = f"{source.describe()} ({obj.name})"

    def attempt() -> None:
        md5 = _md5_for(obj)
        size = 0
        with open(part, "wb") as out:
            for chunk in source.stream(obj):
                out.write(chunk)
                if md5 is not None:
                    md5.update(chunk)
                size += len(chunk)
                if time.monotonic() > deadline:
                    raise PermanentFailure(f"{what}: the download timeout ran out")
        _verify(obj, part, size, md5, what)

    _retrying(what, attempt, deadline)


def _read_ranges(source: Source, obj: RemoteObject, descriptor: int, start: int, end: int, deadline: float,
                 pool: ThreadPoolExecutor, part_size: int) -> None:
    """Bytes [start, end) as parallel ranged reads written in place, each range retried on its own."""
    what = f"{source.describe()} ({obj.name})"

    def read(offset: int) -> None:
        stop = min(offset + part_size, end)

        def attempt() -> None:
            data = source.read_range(obj, offset, stop)
            if len(data) != stop - offset:
                raise DownloadFailed(f"{what}: range {offset}-{stop} came back with {len(data)} bytes")
            os.pwrite(descriptor, data, offset)

        _retrying(what, attempt, deadline)

    futures = [pool.submit(read, offset) for offset in range(start, end, part_size)]
    done, pending = wait(futures, return_when=FIRST_EXCEPTION)
    for future in pending:
        future.cancel()
    wait(pending)
    for future in done:
        future.result()


def _download_large(source: Source, obj: RemoteObject, part: str, deadline: float, pool: ThreadPoolExecutor,
                    part_size: int, readers: int) -> None:
    """One stream or parallel ranges, whichever this server serves faster, measured rather than assumed.

    Object stores give each connection a modest rate (AWS S3 about 100 MB/s), so ranges read at once
    multiply it; some servers instead re-read the whole object for every range (moto: a 1 GiB object
    streams at 1 GB/s, but 8 ranges at once come at 160 MiB/s). So the object is first streamed for
    PROBE_S; a stream at FAST_STREAM_RATE or more reads on to the end; otherwise the last part is read
    as one range, and the rest goes as parallel ranges when ``readers`` of them promise PARALLEL_GAIN
    times the stream's rate. A stream that breaks continues as ranges from where it stopped.
    """
    what = f"{source.describe()} ({obj.name})"
    with open(part, "wb") as out:
        out.truncate(obj.size)
    descriptor = os.open(part, os.O_WRONLY)
    try:
        tail = max(obj.size - part_size, 0)
        position = 0
        stream = source.stream(obj)
        timed_from = timed_position = None
        try:
            for chunk in stream:
                os.pwrite(descriptor, chunk, position)
                position += len(chunk)
                now = time.monotonic()
                if timed_from is None:  # the rate from the first byte on: not the request's latency
                    timed_from, timed_position = now, position
                elif now - timed_from >= PROBE_S or position >= tail:
                    break
        except Exception as error:  # a broken stream: the ranges take over from here
            log.warning("%s; continuing with ranged reads", _classify(error, what))
        elapsed = time.monotonic() - timed_from if timed_from is not None else 0.0
        stream_rate = (position - (timed_position or 0)) / max(elapsed, 1e-6)
        parallel = False
        if stream_rate < FAST_STREAM_RATE and position < tail:
            # The last part as one range: `readers` of them at once promise readers times its rate.
            probe_started = time.monotonic()
            _read_ranges(source, obj, descriptor, tail, obj.size, deadline, pool, part_size)
            range_rate = readers * (obj.size - tail) / max(time.monotonic() - probe_started, 1e-6)
            parallel = range_rate > PARALLEL_GAIN * stream_rate
            log.info("%s: one stream %.0f MiB/s, %d ranges at once about %.0f MiB/s: %s", what,
                     stream_rate / (1 << 20), readers, range_rate / (1 << 20),
                     "parallel ranges" if parallel else "one stream")
        else:
            tail = obj.size  # the stream is fast (or done): it reads to the end
            log.info("%s: one stream at %.0f MiB/s", what, stream_rate / (1 << 20))
        if not parallel and position < tail:
            try:
                for chunk in stream:
                    wanted = min(len(chunk), tail - position)
                    os.pwrite(descriptor, chunk[:wanted], position)
                    position += wanted
                    if position >= tail:
                        break
                    if time.monotonic() > deadline:
                        raise PermanentFailure(f"{what}: the download timeout ran out")
            except PermanentFailure:
                raise
            except Exception as error:
                log.warning("%s; continuing with ranged reads", _classify(error, what))
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        if position < tail:
            _read_ranges(source, obj, descriptor, position, tail, deadline, pool, part_size)
    finally:
        os.close(descriptor)
    _verify(obj, part, os.path.getsize(part), None, what)


def _safe_target(destination: str, name: str) -> str:
    target = os.path.normpath(os.path.join(destination, name))
    if not target.startswith(os.path.normpath(destination) + os.sep):
        raise PermanentFailure(f"refusing the object {name!r}: it would land outside {destination}")
    return target


def download(source: Source, destination: str, deadline: float, readers: int = READERS,
             part_size: int = PART_SIZE, objects: list[RemoteObject] | None = None) -> FetchReport:
    """Every object of ``source`` (as listed, unless given) under ``destination``, each renamed into
    place once verified."""
    started = time.monotonic()
    if objects is None:
        objects = _retrying(source.describe(), source.objects, deadline)
    report = FetchReport()
    with ThreadPoolExecutor(readers, thread_name_prefix="fetch") as pool:
        def one(obj: RemoteObject) -> None:
            target = _safe_target(destination, obj.name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            part = f"{target}.part"
            try:
                if obj.parallel:
                    _download_large(source, obj, part, deadline, pool, part_size, readers)
                else:
                    _download_streamed(source, obj, part, deadline)
                os.replace(part, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(part)

        large = [obj for obj in objects if obj.parallel]
        small = [obj for obj in objects if not obj.parallel]
        # Small files in a pool of their own (the ranges of the large ones need the readers).
        with ThreadPoolExecutor(min(readers, max(len(small), 1)), thread_name_prefix="fetch-small") as files:
            futures: list[Future[None]] = [files.submit(one, obj) for obj in small]
            for obj in large:
                one(obj)
            for future in futures:
                future.result()
    report.files = [obj.name for obj in objects]
    report.bytes = sum(os.path.getsize(_safe_target(destination, obj.name)) for obj in objects)
    report.seconds = time.monotonic() - started
    return report


def download_hf(location: ModelLocation, destination: str) -> FetchReport:
    """A Hugging Face repository at a revision, as KServe fetches it (snapshot_download); HF_TOKEN and
    HF_ENDPOINT from the environment."""
    started = time.monotonic()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        snapshot_download(location.container, revision=location.revision, local_dir=destination)
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as error:
        raise PermanentFailure(f"{location.uri}: {_first_line(str(error))}") from error
    except HfHubHTTPError as error:
        raise DownloadFailed(f"{location.uri}: {_first_line(str(error))}") from error
    report = FetchReport()
    for directory, subdirectories, files in os.walk(destination):
        subdirectories[:] = [d for d in subdirectories if d != ".cache"]
        for name in files:
            path = os.path.join(directory, name)
            report.files.append(os.path.relpath(path, destination))
            report.bytes += os.path.getsize(path)
    report.seconds = time.monotonic() - started
    return report


def source_for(location: ModelLocation) -> Source:
    if location.scheme in ("s3", "gs"):
        return ObjectStoreSource(location)
    if location.scheme in ("http", "https"):
        return HttpSource(location)
    raise PermanentFailure(f"{location.uri}: {location.scheme}:// models are not downloaded (they are mounted)")


def fetch(uri: str, destination: str, timeout_s: float, cache: str | None = None) -> FetchReport:
    """Download the model ``uri`` names into ``destination`` (created); DownloadFailed with the reason.

    With ``cache`` (a shared volume), the download is kept there under the URI and the version of what
    it names, and ``destination`` links to it: the next pod with the same model and version downloads
    nothing.
    """
    location = parse_model_uri(uri)
    os.makedirs(destination, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    if cache is not None:
        return fetch_through_cache(location, destination, cache, deadline)
    if location.scheme == "hf":
        return download_hf(location, destination)
    return download(source_for(location), destination, deadline)


def cache_entry_name(uri: str, version: str) -> str:
    """``<sha256(uri)[:16]>-<sha256(version)[:16]>``: the URI as KServe's LocalModelCache keys it, plus
    the version, so a replaced object is downloaded again rather than served stale."""
    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    return f"{digest(uri)}-{digest(version)}"


def objects_version(objects: list[RemoteObject]) -> str:
    """What identifies this content: every object's name, size and ETag."""
    return "\n".join(f"{obj.name} {obj.size} {obj.etag}" for obj in sorted(objects, key=lambda o: o.name))


def hf_commit(location: ModelLocation) -> str:
    """The commit a Hugging Face revision (branch, tag or sha) points at now."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        sha = HfApi().model_info(location.container, revision=location.revision).sha
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise PermanentFailure(f"{location.uri}: {_first_line(str(error))}") from error
    except HfHubHTTPError as error:
        raise DownloadFailed(f"{location.uri}: {_first_line(str(error))}") from error
    if not sha:
        raise DownloadFailed(f"{location.uri}: the Hub did not say which commit the revision is")
    return sha


def fetch_through_cache(location: ModelLocation, destination: str, cache: str, deadline: float) -> FetchReport:
    """The model from ``cache`` when this version is there, else downloaded into it; linked into
    ``destination`` either way. A download goes to a private temporary directory renamed into place
    once complete, so pods that start together never see each other's partial files (both download;
    the first rename wins)."""
    started = time.monotonic()
    objects: list[RemoteObject] | None = None
    if location.scheme == "hf":
        version = hf_commit(location)
    else:
        source = source_for(location)
        objects = _retrying(source.describe(), source.objects, deadline)
        version = objects_version(objects)
    entry = os.path.join(cache, cache_entry_name(location.uri, version))
    cached = os.path.isdir(entry)
    if cached:
        report = FetchReport(files=_files_under(entry), cached=True)
        report.bytes = sum(os.path.getsize(os.path.join(entry, name)) for name in report.files)
    else:
        os.makedirs(cache, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(entry)}.", dir=cache)
        try:
            if location.scheme == "hf":
                pinned = ModelLocation(location.uri, location.scheme, location.container, "", version)
                report = download_hf(pinned, scratch)
            else:
                report = download(source_for(location), scratch, deadline, objects=objects)
            try:
                os.rename(scratch, entry)
            except OSError:  # another pod finished the same version first: keep theirs
                if not os.path.isdir(entry):
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    for name in os.listdir(entry):
        link = os.path.join(destination, name)
        if os.path.isdir(link) and not os.path.islink(link):
            shutil.rmtree(link)
        elif os.path.lexists(link):
            os.unlink(link)
        os.symlink(os.path.join(entry, name), link)
    report.seconds = time.monotonic() - started
    return report


def _files_under(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(directory, name), root)
                  for directory, _, files in os.walk(root) for name in files)


def watchdog(timeout_s: float, on_expiry: Callable[[], None]) -> threading.Timer:
    """Calls ``on_expiry`` once the total timeout has run out, whatever the download is doing."""
    timer = threading.Timer(timeout_s, on_expiry)
    timer.daemon = True
    timer.start()
    return timer
