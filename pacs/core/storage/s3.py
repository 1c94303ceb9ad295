"""The S3 object store: MinIO, SeaweedFS or any S3 service, through the ``minio`` client.

Objects live in one bucket under the customer's prefix: the key
``<Study>/<Series>/<SOP>.dcm`` is the object ``<customer>/<Study>/<Series>/<SOP>.dcm``,
so customers sharing a bucket never share a key (docs/architecture.md, "Data layout").

Choices that matter for the guarantees (docs/architecture.md, "Guarantees"):

- Every request body carries ``Content-MD5``.  minio-py adds it by itself only over
  HTTPS; over plain HTTP it relies on the signed ``x-amz-content-sha256``, which not
  every server checks (SeaweedFS 4.x accepts a body whose signed SHA-256 differs).
  ``Content-MD5`` is checked by every S3 server before it stores anything, so a body
  damaged in transit is refused (``BadDigest``) instead of stored.  The HTTP client
  given to minio adds it (:class:`_ContentMd5Pool`).
- ``put`` returns only once the PUT (or the multipart upload's completion) has been
  answered with success; S3 makes a completed PUT durable and atomically visible.  A
  short source fails before anything is sent (or aborts the multipart upload), so a
  failed ``put`` leaves no new object.
- Parts are read and sent one at a time, so a put holds at most one part in memory.
- The HTTP pool has a short connect timeout and few retries, so an unreachable
  endpoint fails in seconds instead of minio's default minutes.  Both timeouts derive
  from the time a peer waits for an answer (``PACS_DIMSE_TIMEOUT``, see
  :func:`timeouts_for`), and a request the server did not answer in time is not sent
  again: a stalled server fails a PUT well before the peer gives up, so the peer gets
  a failure status rather than a dropped association.
- Errors become :class:`~pacs.core.errors.StorageError` (or :class:`~pacs.core.errors.ConfigError`
  from :meth:`S3Store.check`) whose messages name the S3 error code or the network
  failure, never the credentials or the object key.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import re
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import certifi
import urllib3
from minio import Minio
from minio.commonconfig import CopySource
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.helpers import MIN_PART_SIZE
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    ResponseError,
    SSLError,
)

from pacs.core.errors import (
    ConfigError,
    NotFound,
    StorageError,
    StoreMissing,
    StoreUnavailable,
    StoreUnreachable,
    UnsettledWrite,
    WriteNotMade,
)
from pacs.core.storage.base import is_object_key, quarantine_folder
from pacs.core.storage.ranged import RangedReader

if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self

    from urllib3.connectionpool import ConnectionPool
    from urllib3.response import BaseHTTPResponse

    from pacs.core.config import Settings

#: Largest part of a multipart upload, and so the most memory one ``put`` holds.  An
#: object up to this size goes in one PUT; 10,000 parts allow objects up to ~156 GiB.
DEFAULT_PART_SIZE = 16 * 1024 * 1024

#: Seconds to wait for a TCP connection: a wrong or firewalled endpoint fails fast.
#: urllib3 also bounds each send of a request body by it (a server that stops reading).
CONNECT_TIMEOUT = 5.0

#: Seconds to wait for each read from an established connection (not for the whole
#: response): generous, as a busy server may take a while to answer a large PUT.
READ_TIMEOUT = 15.0

#: Size of the buffer in front of an object's HTTP response.
_READ_BUFFER = 1024 * 1024

#: S3 error codes meaning the credentials are wrong or lack permission.
_CREDENTIAL_CODES = frozenset(
    {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "InvalidToken",
     "ExpiredToken", "InvalidSecurity"}
)
#: Error codes of an S3 server that answers but cannot serve now (overloaded, starting,
#: or failing inside): the store is down, not misconfigured.
_UNAVAILABLE_CODES = frozenset(
    {"ServiceUnavailable", "SlowDown", "InternalError", "XMinioServerNotInitialized"}
)

#: ``Content-Range`` of a ranged answer: ``bytes <first>-<last>/<size>`` (RFC 9110 14.4).
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")

#: S3 error codes meaning the object (or its whole bucket) is not there.
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NotFound", "NoSuchBucket"})

log = logging.getLogger(__name__)

# The customer name becomes the key prefix: the alphabet pacs.core.config allows.
_CUSTOMER_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def timeouts_for(answer_within: float) -> tuple[float, float]:
    """The (connect, read) timeouts that let a request fail within ``answer_within``.

    A PUT to a stalled server (stopped, or too busy to answer) takes at most two connect
    timeouts (a connection or send that stalls is tried once more) and one read timeout
    (a request the server did not answer is not sent again, see :class:`_Retry`), plus
    under a second of back-off: with connect = ``answer_within`` / 12 (2 to 5 s) and
    read = ``answer_within`` / 4, about half of ``answer_within``.  A multipart upload
    (objects over the part size) that fails is aborted by minio, which may take as long
    again: 50 s of the default 60.

    Parameters
    ----------
    answer_within : float
        Seconds the peer waits for the answer (``PACS_DIMSE_TIMEOUT``).

    Returns
    -------
    (float, float)
        Seconds; 5 and 15 for the default of 60.
    """
    connect = min(CONNECT_TIMEOUT, max(2.0, answer_within / 12))
    read = max(2.0, answer_within / 4)
    return connect, read


#: The requests that write a key (a part of a multipart upload writes none: the
#: object is what its completion, a POST never retried, names).
_WRITES = ("PUT", "DELETE")


class _Retry(urllib3.Retry):
    """urllib3's retries, except for a request the server did not answer in time.

    Sending it again would double the time a stalled server holds the caller (the
    server, not the network, is what failed); a dropped connection or a refused one is
    still retried.  When the retries run out, the error reported is the first attempt
    that may have reached the server (a dropped connection) rather than the last one
    (a refused connection, say): a write that may have been carried out must not look
    settled (:func:`_unanswered`).
    """

    #: Called with the method and URL of a write whose attempt may have been carried
    #: out before it is tried again (:meth:`S3Store._sent_before_retry`).
    sent_before_retry: Callable[[str, str], None] | None = None

    def new(self, **kw: Any) -> Self:
        """urllib3 makes a new object for each attempt: the callback goes along."""
        retry = super().new(**kw)
        retry.sent_before_retry = self.sent_before_retry
        return retry

    def increment(self, method: str | None = None, url: str | None = None,
                  response: BaseHTTPResponse | None = None, error: Exception | None = None,
                  _pool: ConnectionPool | None = None,
                  _stacktrace: TracebackType | None = None) -> Self:
        """Raise a read timeout at once; count anything else as urllib3 does.

        A write tried again after an attempt the server may have carried out (a
        connection dropped once the request was sent, a server error other than Slow
        Down) is told to :attr:`sent_before_retry` first: a retry that succeeds does
        not make that attempt settled, and a late one would land over whatever is
        written to the key afterwards.
        """
        if isinstance(error, ReadTimeoutError):
            raise error
        maybe_done = isinstance(error, ProtocolError) or (
            response is not None and response.status >= 500 and response.status != 503)
        if (maybe_done and method in _WRITES and url is not None
                and self.sent_before_retry is not None):
            self.sent_before_retry(method, url)
        try:
            return super().increment(method, url, response, error, _pool, _stacktrace)
        except MaxRetryError as exc:
            sent = next((past.error for past in self.history
                         if isinstance(past.error, ProtocolError)), None)
            if sent is None or isinstance(exc.reason, ProtocolError):
                raise
            raise MaxRetryError(exc.pool, exc.url, sent) from exc


class _NoRetryWarnings(logging.Filter):
    """Drops urllib3's "Retrying ..." warnings: they name the object's URL, whose key is
    made of the instance's UIDs.  A request that fails in the end is reported by the
    caller, with the reason and without the key."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a retry warning."""
        return not str(record.msg).startswith("Retrying")


def _quiet_retry_warnings() -> None:
    """Install :class:`_NoRetryWarnings` on urllib3's pool logger (once)."""
    logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _NoRetryWarnings) for f in logger.filters):
        logger.addFilter(_NoRetryWarnings())


class _ContentMd5Pool(urllib3.PoolManager):
    """The HTTP client handed to minio: it adds ``Content-MD5`` to every request body.

    minio-py computes ``Content-MD5`` itself over HTTPS only; over plain HTTP it relies
    on the signed ``x-amz-content-sha256``, which not every server checks.  minio takes
    its HTTP client as a public argument (``http_client``) and sends every request
    through its ``urlopen`` with the final body, so this is where the header goes in -
    after minio has signed the request, which S3 allows: a server checks the headers
    the signature lists and verifies ``Content-MD5`` whether or not it is signed.  A
    ``Content-MD5`` already present (minio's own, over HTTPS or for bucket
    configuration calls) is kept.
    """

    # urllib3's PoolManager narrows the signature of RequestMethods.urlopen the same way.
    def urlopen(  # type: ignore[override]
            self, method: str, url: str, redirect: bool = True, **kw: Any,
    ) -> BaseHTTPResponse:
        """Send the request with ``Content-MD5`` added to a non-empty body."""
        body = kw.get("body")
        if isinstance(body, bytes | bytearray | memoryview) and len(body):
            headers = urllib3.HTTPHeaderDict(kw.get("headers") or {})
            if "Content-MD5" not in headers:
                headers["Content-MD5"] = content_md5(body)
                kw["headers"] = headers
        return super().urlopen(method, url, redirect, **kw)


def content_md5(body: bytes | bytearray | memoryview) -> str:
    """The ``Content-MD5`` of a body (RFC 1864: base64 of the MD5 digest)."""
    digest = hashlib.md5(body, usedforsecurity=False).digest()
    return base64.b64encode(digest).decode("ascii")


@contextmanager
def _body_errors() -> Iterator[None]:
    """A failure while an answer's body is read as :class:`StorageError`.

    urllib3 checks the received length against Content-Length, so a connection cut
    mid-object raises instead of reading as a short object.
    """
    try:
        yield
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise StoreUnavailable(f"S3 read failed: {_network_reason(exc)}") from exc


class _ObjectStream(io.RawIOBase):
    """An object's HTTP response as a raw binary stream.

    Closing it closes the response and hands the connection back to the pool, which
    ``urllib3`` does not do when a body is left unread.

    Parameters
    ----------
    response : urllib3.response.BaseHTTPResponse
        The unread response of a GET (``preload_content=False``).
    """

    def __init__(self, response: BaseHTTPResponse) -> None:
        super().__init__()
        self._response = response

    def readable(self) -> bool:
        """Always true."""
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        """Read up to ``len(buffer)`` bytes; 0 at the end of the object."""
        with _body_errors():
            return self._response.readinto(buffer)

    def readall(self) -> bytes:
        """The rest of the object, read by urllib3 at once (io's default reads it in
        8 KiB pieces and joins them: four times the CPU for a large object)."""
        with _body_errors():
            return self._response.read()

    def close(self) -> None:
        """Close the response and release its connection (idempotent)."""
        if not self.closed:
            try:
                self._response.close()
                self._response.release_conn()
            finally:
                super().close()


class _Pinned:
    """The fetch of an object's :class:`RangedReader`: ranged GETs of the version the
    first one answered (its ETag)."""

    def __init__(self, get: Callable[[int, int, str | None], tuple[bytes, int, str | None]]
                 ) -> None:
        self._get = get
        self._etag: str | None = None

    def __call__(self, start: int, length: int) -> tuple[bytes, int]:
        """``length`` bytes from ``start`` and the object's size."""
        data, size, etag = self._get(start, length, self._etag)
        if self._etag is None:
            self._etag = etag
        return data, size


class _CountingReader:
    """Counts the bytes minio reads from a source, to tell a short source apart.

    Parameters
    ----------
    source : BinaryIO
        The caller's stream.
    """

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self.count = 0
        self.eof = False

    def read(self, size: int = -1) -> bytes:
        """Read from the source, noting the count and the end of the stream."""
        data = self._source.read(size)
        if not data and size != 0:
            self.eof = True
        self.count += len(data)
        return data


class S3Store:
    """Objects in an S3 bucket under the customer's prefix.

    Capabilities (:mod:`pacs.core.storage`): :class:`~pacs.core.storage.Usage` (one
    listing carries every size), :class:`~pacs.core.storage.Quarantine`,
    :class:`~pacs.core.storage.ModifiedTimes` and :class:`~pacs.core.storage.RandomAccess`
    (ranged GETs).

    Parameters
    ----------
    endpoint : str
        ``host:port`` of the S3 service, without a scheme.
    access_key, secret_key : str
        The credentials; never written into a message or a log.
    bucket : str
        The bucket; :meth:`check` creates it when missing.
    customer : str
        The customer name: objects are stored under ``<customer>/``.
    secure : bool
        Use HTTPS.
    region : str
        The region to sign requests for; given explicitly so that minio does not ask
        the server for the bucket's location before the first request.
    part_size : int
        Size of each part of a multipart upload (at least 5 MiB, S3's minimum); objects
        up to this size are sent in a single PUT.
    connect_timeout, read_timeout : float
        Seconds to wait for a connection (and for each send), and for each read of an
        answer (see :func:`timeouts_for`).

    Raises
    ------
    ConfigError
        When the endpoint, customer or part size cannot be used.
    """

    def __init__(
        self,
        *,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        customer: str,
        secure: bool = False,
        region: str = "us-east-1",
        part_size: int = DEFAULT_PART_SIZE,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        if not _CUSTOMER_RE.match(customer):
            raise ConfigError("the customer name must be 1-64 letters, digits, '-' or '_'")
        if part_size < MIN_PART_SIZE:
            raise ConfigError(f"the S3 part size must be at least {MIN_PART_SIZE} bytes")
        self.endpoint = endpoint
        self.bucket = bucket
        self.region = region
        self.part_size = part_size
        self.customer = customer
        self._prefix = f"{customer}/"
        #: Called with the key of a write S3 did not answer, before it is raised
        #: (:class:`~pacs.core.storage.LateWrites`).
        self.on_unanswered: Callable[[str], None] | None = None
        # minio's own pool waits 5 minutes per connection attempt and retries 5 times;
        # an unreachable endpoint must fail at start-up in seconds.  PUT, GET, HEAD and
        # DELETE are idempotent, so urllib3 may retry them; the multipart POSTs are not
        # retried (urllib3's default allowed_methods).  Connections that failed are
        # dropped, so the pool recovers by itself once the server is back.
        _quiet_retry_warnings()
        self._http = _ContentMd5Pool(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            retries=self._retries(
                total=3,
                connect=1,
                read=1,
                status=2,
                backoff_factor=0.2,
                status_forcelist=(500, 502, 503, 504),
                # The last answer goes to minio once the retries run out, which reads
                # its S3 error code (SlowDown is a refusal; InternalError may not be).
                raise_on_status=False,
            ),
            # One connection per concurrent association is kept for reuse.
            maxsize=16,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        try:
            self._client = Minio(
                endpoint=endpoint,
                access_key=access_key,
                secret_key=secret_key,
                secure=secure,
                region=region or None,
                http_client=self._http,
            )
        except ValueError as exc:
            # minio's message names the endpoint only (e.g. a scheme or path in it).
            raise ConfigError(f"PACS_S3_ENDPOINT: {exc}; expected host:port") from None

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Store:
        """The store the ``PACS_S3_*`` settings and ``CUSTOMER`` describe.

        Parameters
        ----------
        settings : pacs.core.config.Settings
            The node's settings.

        Returns
        -------
        S3Store
            An unchecked store; call :meth:`check` before use.
        """
        connect, read = timeouts_for(settings.dimse_timeout)
        return cls(
            endpoint=settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            bucket=settings.s3_bucket,
            customer=settings.customer,
            secure=settings.s3_secure,
            region=settings.s3_region,
            connect_timeout=connect,
            read_timeout=read,
        )

    def _object_name(self, key: str) -> str:
        # Keys come from validated UIDs; refuse anything else so that no value from
        # the network can name an object outside the customer's prefix.
        if not is_object_key(key):
            raise StorageError("refusing an object key that is not derived from UIDs")
        return self._prefix + key

    def _retries(self, **kw: Any) -> _Retry:
        """The client's retries, telling :meth:`_sent_before_retry` of writes tried
        again."""
        retry = _Retry(**kw)
        retry.sent_before_retry = self._sent_before_retry
        return retry

    def _sent_before_retry(self, method: str, url: str) -> None:
        """A write of this store is tried again after an attempt S3 may still carry
        out: its key is unsettled (:attr:`on_unanswered`), whatever the retry meets."""
        parts = urllib.parse.urlsplit(url)
        if "uploadId" in urllib.parse.parse_qs(parts.query):
            return  # a part: the object is the completion's
        path = urllib.parse.unquote(parts.path)
        key = next((path[len(start):] for start in (f"/{self.bucket}/{self._prefix}",
                                                    f"/{self._prefix}")
                    if path.startswith(start)), None)
        if key is None or not is_object_key(key) or self.on_unanswered is None:
            return  # the quarantine's copy writes no key of the store
        try:
            self.on_unanswered(key)
        except Exception:  # the write goes on; its own failure would be told again
            log.exception("S3: a write tried again could not be recorded as unsettled")

    @contextmanager
    def _storage_errors(self, action: str, written: str | None = None) -> Iterator[None]:
        """Turn minio and urllib3 failures inside the block into :class:`StorageError`;
        a write of key ``written`` that S3 may still carry out (:func:`_unanswered`)
        into :class:`UnsettledWrite`, once :attr:`on_unanswered` has been told."""
        try:
            yield
        except S3Error as exc:
            raise self._failure(written, exc, f"S3 {action} failed: {exc.code}") from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise self._failure(written, exc,
                                f"S3 {action} failed: {_network_reason(exc)}") from exc

    def _failure(self, written: str | None, exc: BaseException, message: str
                 ) -> StorageError:
        """The error of a failed request: :class:`UnsettledWrite` for a write S3 may
        still carry out (its key told to :attr:`on_unanswered` first),
        :class:`WriteNotMade` for one it never will (:func:`_unanswered`: it stored
        nothing)."""
        if written is None:
            # S3 answered with an error (this object's), or did not answer at all.
            return StorageError(message) if isinstance(exc, S3Error) else StoreUnavailable(
                message)
        if not _unanswered(exc):
            return WriteNotMade(message)
        if self.on_unanswered is not None:
            try:
                self.on_unanswered(written)
            except Exception:  # the write's own failure is what the caller gets
                log.exception("S3: an unanswered write could not be recorded")
        return UnsettledWrite(message)

    def put(self, key: str, source: BinaryIO, length: int) -> None:
        """Store ``length`` bytes of ``source`` under ``key``; return once stored.

        Parameters
        ----------
        key : str
            An object key as :func:`pacs.core.storage.object_key` builds it.
        source : BinaryIO
            The bytes; exactly ``length`` of them are read.
        length : int
            The object's size.

        Raises
        ------
        StorageError
            When the key is refused, the source is shorter than ``length``, or S3
            fails; no new object is left behind.
        """
        name = self._object_name(key)
        if length < 0:
            raise StorageError("the object length must be known")
        reader = _CountingReader(source)
        with self._storage_errors("write", written=key):
            try:
                self._client.put_object(
                    bucket_name=self.bucket,
                    object_name=name,
                    data=cast(BinaryIO, reader),
                    length=length,
                    content_type="application/dicom",
                    part_size=self.part_size,
                    # Parallel parts would be queued in memory ahead of the uploads;
                    # one at a time keeps a put to a single part in memory.
                    num_parallel_uploads=1,
                )
            except OSError as exc:
                # minio reads the source itself and raises IOError for a short source
                # before sending the part (aborting a multipart upload); any other
                # OSError is the source failing and is reported as such.
                if reader.eof and reader.count < length:
                    raise StorageError(
                        f"short source: {reader.count} of {length} bytes"
                    ) from exc
                raise

    def open(self, key: str) -> BinaryIO:
        """A buffered stream of the object's bytes; the caller closes it.

        Raises
        ------
        NotFound
            When there is no such object.
        StorageError
            When S3 fails.
        """
        name = self._object_name(key)
        with self._storage_errors("read"):
            try:
                response = self._client.get_object(bucket_name=self.bucket, object_name=name)
            except S3Error as exc:
                if exc.code in _MISSING_CODES:
                    raise NotFound("no such object") from None
                raise
        return io.BufferedReader(_ObjectStream(response), buffer_size=_READ_BUFFER)

    def open_ranged(self, key: str) -> BinaryIO:
        """A seekable stream of the object whose reads are ranged GETs
        (:class:`~pacs.core.storage.ranged.RangedReader`); the caller closes it.

        Nothing is requested before the first read.  Every GET after the first names
        the ETag the first one answered (``If-Match``), so a stream never joins parts
        of two versions of an object overwritten meanwhile: it fails instead.

        Raises
        ------
        NotFound
            When there is no such object (at the first read).
        StorageError
            When S3 fails, or the object changed between two reads of the stream.
        """
        self._object_name(key)  # refuse a bad key now, not at the first read
        return cast(BinaryIO, RangedReader(_Pinned(partial(self._range, key)),
                                           partial(self.size, key)))

    def _range(self, key: str, start: int, length: int,
               etag: str | None) -> tuple[bytes, int, str | None]:
        """Up to ``length`` bytes of the object from ``start``, its size and its ETag;
        with ``etag``, only from that version of the object (``If-Match``)."""
        name = self._object_name(key)
        with self._storage_errors("read"):
            try:
                response = self._client.get_object(
                    bucket_name=self.bucket, object_name=name, offset=start, length=length,
                    request_headers=cast(Any, {"If-Match": etag} if etag else {}))
            except S3Error as exc:
                if exc.code in _MISSING_CODES:
                    raise NotFound("no such object") from None
                if exc.code == "PreconditionFailed":
                    raise StorageError("S3 read failed: the object changed while it "
                                       "was read") from None
                if exc.code == "InvalidRange":  # starts at or past the end
                    return b"", self.size(key), etag
                raise
            try:
                with _body_errors():
                    data = response.read()
                headers = response.headers
            finally:
                response.close()
                response.release_conn()
        data, size = _ranged_answer(data, headers.get("Content-Range"), start, length)
        return data, size, headers.get("ETag")

    def size(self, key: str) -> int:
        """The object's size in bytes.

        Raises
        ------
        NotFound
            When there is no such object.
        """
        name = self._object_name(key)
        with self._storage_errors("stat"):
            try:
                stat = self._client.stat_object(bucket_name=self.bucket, object_name=name)
            except S3Error as exc:
                if exc.code in _MISSING_CODES:
                    raise NotFound("no such object") from None
                raise
        return int(stat.size or 0)

    def delete(self, key: str) -> None:
        """Remove the object; a missing object (or bucket) is not an error."""
        name = self._object_name(key)
        # A deletion S3 may still carry out is unsettled too: landing late, it would
        # remove an object written at the key since.
        with self._storage_errors("delete", written=key):
            try:
                self._client.remove_object(bucket_name=self.bucket, object_name=name)
            except S3Error as exc:
                if exc.code not in _MISSING_CODES:
                    raise

    def _listing(self) -> Iterator[tuple[str, int]]:
        """Each stored key of this customer with its size; a missing bucket is empty."""
        for key, obj in self._listed():
            yield key, int(obj.size or 0)

    def modified_times(self) -> Iterator[tuple[str, float]]:
        """Each stored key with the POSIX time of its last write (``LastModified`` of
        one listing): the :class:`~pacs.core.storage.ModifiedTimes` capability."""
        for key, obj in self._listed():
            if obj.last_modified is not None:
                yield key, obj.last_modified.timestamp()

    def _listed(self) -> Iterator[tuple[str, Any]]:
        """Each stored key of this customer with minio's listing entry."""
        with self._storage_errors("list"):
            try:
                objects = self._client.list_objects(
                    bucket_name=self.bucket, prefix=self._prefix, recursive=True
                )
                for obj in objects:
                    name = obj.object_name or ""
                    key = name[len(self._prefix):]
                    # Anything else under the prefix (a stray upload, a folder marker)
                    # is not one of our objects.
                    if not obj.is_dir and name.startswith(self._prefix) and is_object_key(key):
                        yield key, obj
            except S3Error as exc:
                if exc.code != "NoSuchBucket":
                    raise

    def quarantine(self, key: str, folder: str) -> str:
        """Move the object to ``<customer>/quarantine/<folder>/<key>``; return that name.

        A server-side copy, then the removal of the original: a failure in between
        leaves both (never neither).  The quarantine is outside :meth:`keys`, whose keys
        start with a UID.

        Raises
        ------
        NotFound
            When there is no such object.
        StorageError
            When S3 fails.
        """
        name = self._object_name(key)
        target = f"{self._prefix}quarantine/{quarantine_folder(folder)}/{key}"
        with self._storage_errors("quarantine"):
            try:
                self._client.copy_object(bucket_name=self.bucket, object_name=target,
                                         source=CopySource(self.bucket, name))
            except S3Error as exc:
                if exc.code in _MISSING_CODES:
                    raise NotFound("no such object") from None
                raise
        # A removal S3 may still carry out is unsettled, as any other (remove).
        with self._storage_errors("quarantine", written=key):
            self._client.remove_object(bucket_name=self.bucket, object_name=name)
        return target

    def keys(self) -> Iterator[str]:
        """Every object key of this customer, without the prefix."""
        for key, _size in self._listing():
            yield key

    def check(self, create: bool = True) -> None:
        """Make sure the endpoint answers, the credentials work and the bucket exists.

        The bucket is created when missing, with ``create``.

        Raises
        ------
        ConfigError
            When the endpoint cannot be reached, refuses the credentials, or the bucket
            can be neither found nor (with ``create``) created.
        """
        where = f"S3 at {self.endpoint}"
        try:
            if not self._client.bucket_exists(bucket_name=self.bucket):
                if not create:
                    raise StoreMissing(
                        f"{where} has no bucket {self.bucket!r}: check PACS_S3_BUCKET "
                        "and PACS_S3_ENDPOINT")
                try:
                    self._client.make_bucket(
                        bucket_name=self.bucket, location=self.region or None
                    )
                except S3Error as exc:
                    # Another node may have created it between the two calls.
                    if exc.code != "BucketAlreadyOwnedByYou":
                        raise
        except S3Error as exc:
            if exc.code in _CREDENTIAL_CODES:
                raise ConfigError(
                    f"{where} refused the credentials ({exc.code}): check "
                    "PACS_S3_ACCESS_KEY, PACS_S3_SECRET_KEY and the key's permissions "
                    f"on bucket {self.bucket!r}"
                ) from exc
            if exc.code in _UNAVAILABLE_CODES:
                raise StoreUnreachable(f"{where} cannot serve now ({exc.code})") from exc
            raise ConfigError(
                f"{where}: cannot use or create bucket {self.bucket!r} ({exc.code})"
            ) from exc
        except ValueError as exc:
            raise ConfigError(f"PACS_S3_BUCKET: {exc}") from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise StoreUnreachable(
                f"cannot reach {where}: {_network_reason(exc)}; check PACS_S3_ENDPOINT "
                "and PACS_S3_SECURE"
            ) from exc

    def usage(self) -> int:
        """Bytes stored under this customer's prefix."""
        return sum(size for _key, size in self._listing())

    def close(self) -> None:
        """Close the pooled connections."""
        self._http.clear()


def _ranged_answer(data: bytes, content_range: str | None, start: int,
                   length: int) -> tuple[bytes, int]:
    """The bytes asked for and the object's size, from the answer to a ranged GET.

    A server that ignores ``Range`` answers the whole object (200, no
    ``Content-Range``): the range is cut from it.
    """
    if content_range is None:
        return data[start:start + length], len(data)
    match = _CONTENT_RANGE_RE.match(content_range.strip())
    if match is None or int(match.group(1)) != start:
        raise StorageError("S3 read failed: the answer is not the range asked for")
    return data, int(match.group(3))


#: S3 error codes of a write the server may have carried out all the same (an
#: internal error after the object was stored); any other code refused it.
_UNSETTLED_CODES = frozenset({"InternalError"})


def _unanswered(exc: BaseException) -> bool:
    """True when a write that failed with ``exc`` may still be carried out by S3.

    A request that never reached the server (no connection could be made) or that the
    server refused with an S3 error is settled: nothing will be stored.  One that was
    sent and not answered (a read timeout, a connection dropped after the request was
    sent, a server error without an S3 answer, an answer that is not S3's, from a
    proxy say) may be completed later by a server that had received it: the late
    write then lands over whatever was written to the key since
    (:class:`~pacs.core.errors.UnsettledWrite`).  A failure of the source is
    settled (the body was not complete).
    """
    if isinstance(exc, S3Error):
        return exc.code in _UNSETTLED_CODES
    if isinstance(exc, ServerError):
        return exc.status_code != 503  # Slow Down / Service Unavailable: not taken
    reason = getattr(exc, "reason", None)  # MaxRetryError: the last attempt's error
    if isinstance(reason, BaseException):
        exc = reason
    # NewConnectionError and NameResolutionError are ConnectTimeoutErrors too.
    if isinstance(exc, ConnectTimeoutError):
        return False
    return not isinstance(exc, (OSError, ValueError))


def _network_reason(exc: BaseException) -> str:
    """A short description of a transport failure, without URLs or credentials."""
    # MaxRetryError carries the last underlying error as ``reason``.
    reason = getattr(exc, "reason", None)
    if isinstance(reason, BaseException):
        exc = reason
    # Order matters: NameResolutionError < NewConnectionError < ConnectTimeoutError.
    if isinstance(exc, NameResolutionError):
        return "host name not found"
    if isinstance(exc, NewConnectionError):
        return "connection refused or host unreachable"
    if isinstance(exc, ConnectTimeoutError):
        return "connection timed out"
    if isinstance(exc, ReadTimeoutError):
        return "timed out waiting for the server"
    if isinstance(exc, SSLError):
        return "TLS handshake failed (is PACS_S3_SECURE right?)"
    if isinstance(exc, ProtocolError):
        return "connection dropped"
    if isinstance(exc, ResponseError):
        return "the server kept answering with errors"
    if isinstance(exc, ServerError):
        return f"server error (HTTP {exc.status_code})"
    if isinstance(exc, InvalidResponseError):
        return "the answer was not S3's (is PACS_S3_ENDPOINT an S3 service?)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
