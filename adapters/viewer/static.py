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
"""

from __future__ import annotations

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


def media_type(path: Path) -> str:
    """The Content-Type of a dist file."""
    suffix = path.suffix.lower()
    if suffix in MEDIA_TYPES:
        return MEDIA_TYPES[suffix]
    return _FALLBACK_TYPES.guess_type(path.name)[0] or "application/octet-stream"


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
        if relative in ("", "."):
            return self.dist / "index.html"
        candidate = Path(os.path.realpath(self.dist / relative))
        if candidate.is_relative_to(self.dist) and candidate.is_file():
            return candidate
        if "." in posixpath.basename(relative):
            return None  # a missing asset, not a route
        return self.dist / "index.html"

    def _send_file(self, req: falcon.Request, resp: falcon.Response, path: Path) -> None:
        info = path.stat()
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

