"""OHIF's prebuilt files, served the way a single-page application needs.

- ``/app-config.js`` is ours (``adapters/viewer/app-config.js``), never the dist's,
  which points at a public demo server; ``Cache-Control: no-store`` so a changed
  configuration is seen at the next load.
- A path that names a file of the dist gets that file, with a media type from a fixed
  table: ``.wasm`` must be ``application/wasm`` for the browser to compile it
  streaming, and the system's ``/etc/mime.types`` (absent on slim images, different
  elsewhere) is not consulted.
- Any other path without an extension (``/``, ``/viewer``, ``/viewer/dicomweb``) is a
  client-side route: ``index.html``.  A missing path *with* an extension is a real
  ``404``, so a missing bundle is not answered with HTML.
- File names with a content hash (``app.bundle.0f6159c501addfe9.js``) are cached for a
  year; other files are revalidated (``ETag`` / ``If-None-Match``).
- Paths are resolved inside the dist only; ``..`` and links out of it are ``404``.
- Every answer carries ``nosniff`` and the viewer's Content-Security-Policy
  (:data:`VIEWER_POLICY`): what OHIF needs and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import os
import posixpath
import re
from pathlib import Path

import falcon

#: Media types by suffix, for the files a build of OHIF holds.
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".jpg": "image/jpeg",
    ".gif": "image/gif",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".txt": "text/plain; charset=utf-8",
    ".xml": "application/xml",
}
#: Python's built-in table (no system files) for anything else.
_FALLBACK_TYPES = mimetypes.MimeTypes()
#: A 16-hex-digit content hash in a file name: such files never change.
_HASHED = re.compile(r"(^|\.)[0-9a-f]{16}\.")
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"


#: The viewer's Content-Security-Policy (CSP Level 3), checked with OHIF 3.13 in
#: headless Chromium (tests/interop/test_ohif.py):
#:
#: - scripts: the dist's bundles (same origin), the inline scripts of ``index.html`` by
#:   hash, and WebAssembly compilation (``'wasm-unsafe-eval'``: the image codecs -
#:   JPEG, JPEG-LS, JPEG 2000, HTJ2K - are wasm); no ``eval`` in the page
#:   (:data:`WORKER_SCRIPTS` for the workers);
#: - workers: the codec and ONNX workers (same origin, and ``blob:`` for ONNX's proxy);
#: - images: same origin, ``data:`` and ``blob:`` (thumbnails, canvases, icons);
#: - styles: same origin and inline (React style attributes and injected CSS);
#: - fonts: same origin and ``data:``;
#: - fetch/XHR: same origin only (DICOMweb is at ``/dicom-web`` on this port), and
#:   ``blob:`` / ``data:`` (decoded buffers, inline binaries);
#: - media, objects and frames: same origin and ``blob:`` (OHIF's video and PDF
#:   viewports show a retrieved video or document from a blob URL);
#: - nothing may frame the viewer from another origin, and forms and ``<base>`` stay
#:   on this origin.
VIEWER_POLICY = (
    "default-src 'self'",
    "script-src 'self' 'wasm-unsafe-eval'{scripts}",
    "worker-src 'self' blob:",
    "img-src 'self' data: blob:",
    "style-src 'self' 'unsafe-inline'",
    "font-src 'self' data:",
    "connect-src 'self' data: blob:",
    "media-src 'self' blob:",
    "object-src 'self' blob:",
    "frame-src 'self' blob:",
    "base-uri 'self'",
    "form-action 'self'",
    "frame-ancestors 'self'",
)
#: What a worker may run beside :data:`VIEWER_POLICY`'s scripts.  A dedicated
#: worker's policy is the one its script was served with (CSP Level 3, 6.3.1), not
#: the page's: script files (a script's own policy matters nowhere else) are served
#: with ``'unsafe-eval'``, because the JPEG 2000 decoder of OHIF 3.13's image loader
#: worker (OpenJPEG built with Emscripten's embind) makes functions from strings.
#: The page itself never evaluates strings.
WORKER_SCRIPTS = " 'unsafe-eval'"
_INLINE_SCRIPT = re.compile(rb"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.S | re.I)
_SCRIPT_SUFFIXES = (".js", ".mjs")


def content_security_policy(index_html: bytes) -> str:
    """:data:`VIEWER_POLICY` for the page: its inline scripts (OHIF's ``index.html``
    sets ``window.PUBLIC_URL`` inline) allowed by their SHA-256, no
    ``'unsafe-inline'`` for scripts, so an injected script does not run."""
    hashes = "".join(
        f" 'sha256-{base64.b64encode(hashlib.sha256(body).digest()).decode()}'"
        for body in _INLINE_SCRIPT.findall(index_html))
    return "; ".join(VIEWER_POLICY).format(scripts=hashes)


def worker_security_policy() -> str:
    """:data:`VIEWER_POLICY` for workers (served with every script file)."""
    return "; ".join(VIEWER_POLICY).format(scripts=WORKER_SCRIPTS)


def media_type(path: Path) -> str:
    """The Content-Type of a dist file."""
    suffix = path.suffix.lower()
    if suffix in MEDIA_TYPES:
        return MEDIA_TYPES[suffix]
    return _FALLBACK_TYPES.guess_type(path.name)[0] or "application/octet-stream"


def _is_file(path: Path) -> bool:
    """``path.is_file()``, false for a name the file system cannot hold (ENAMETOOLONG,
    which Python 3.11's ``is_file`` raises): no file has it."""
    try:
        return path.is_file()
    except OSError:
        return False


class OhifFiles:
    """A falcon sink serving one OHIF dist folder.

    Parameters
    ----------
    dist : Path
        The folder with OHIF's ``index.html``.
    app_config : bytes
        The JavaScript served at ``/app-config.js``.
    """

    def __init__(self, dist: Path, app_config: bytes) -> None:
        self.dist = Path(os.path.realpath(dist))
        self.app_config = app_config
        index = self.dist / "index.html"
        #: The page's Content-Security-Policy (:func:`content_security_policy`); script
        #: files get :func:`worker_security_policy`.
        self.policy = content_security_policy(index.read_bytes() if index.is_file() else b"")
        self.worker_policy = worker_security_policy()

    def __call__(self, req: falcon.Request, resp: falcon.Response, **_: str) -> None:
        """Answer GET and HEAD for any path (the sink's prefix is ``/``).

        Raises
        ------
        falcon.HTTPNotFound
            A missing file with an extension, or a path out of the dist.
        falcon.HTTPMethodNotAllowed
            Anything but GET and HEAD.
        """
        if req.method not in ("GET", "HEAD"):
            raise falcon.HTTPMethodNotAllowed(["GET", "HEAD"])
        resp.set_header("X-Content-Type-Options", "nosniff")
        if req.path == "/app-config.js":
            resp.set_header("Content-Security-Policy", self.worker_policy)
            resp.content_type = MEDIA_TYPES[".js"]
            resp.cache_control = ["no-store"]
            resp.data = self.app_config
            return
        path = self.resolve(req.path)
        if path is None:
            raise falcon.HTTPNotFound()
        self._send_file(req, resp, path)

    def resolve(self, url_path: str) -> Path | None:
        """The file for ``url_path``: itself, ``index.html`` for a route, or ``None``."""
        relative = posixpath.normpath("/" + url_path).lstrip("/")
        if "\x00" in relative:
            return None
        if any(part.startswith(".") for part in relative.split("/")):
            # A hidden file or folder (.git, .env, .htpasswd) of a dist an operator
            # gave (PACS_VIEWER_DIST) is no part of the viewer; OHIF's has none.
            return None
        if relative in ("", "."):
            return self.dist / "index.html"
        candidate = Path(os.path.realpath(self.dist / relative))
        if candidate.is_relative_to(self.dist) and _is_file(candidate):
            return candidate
        if "." in posixpath.basename(relative):
            return None  # a missing asset, not a route
        return self.dist / "index.html"

    def _send_file(self, req: falcon.Request, resp: falcon.Response, path: Path) -> None:
        info = path.stat()
        # Also on a 304: its headers replace the cached response's (RFC 9111 4.3.4).
        resp.set_header("Content-Security-Policy", self.worker_policy
                        if path.suffix.lower() in _SCRIPT_SUFFIXES else self.policy)
        resp.cache_control = [IMMUTABLE if _HASHED.search(path.name) else REVALIDATE]
        # npm tarballs stamp every file 1985-10-26: Last-Modified would say nothing,
        # so the validator is an ETag of size, time and inode (a new dist, new inodes).
        tag = f"{info.st_size:x}-{info.st_mtime_ns:x}-{info.st_ino:x}"
        resp.etag = f'"{tag}"'
        wanted = req.if_none_match or ()  # falcon's ETags compare to unquoted text
        if tag in wanted or "*" in wanted:
            resp.status = falcon.HTTP_304
            resp.content_type = None  # a 304 has no content, so no type (RFC 9110 15.4.5)
            return
        resp.content_type = media_type(path)
        resp.content_length = info.st_size
        if req.method == "GET":
            # A file object: gunicorn sends it with sendfile(), no copy in Python.
            resp.stream = open(path, "rb")  # noqa: SIM115 - the server closes it

