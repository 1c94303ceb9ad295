# pacs: the node (DIMSE 32773, DICOMweb 5985, OHIF viewer 8080) in one image.
#
#   docker build -t intelpixel/pacs .
#   docker compose up          (with MinIO: see compose.yml and the README)
#
# Stage 1 fetches the prebuilt OHIF viewer from the npm registry (`npm pack`: the tarball
# already holds the production build; nothing is built, nothing of OHIF's dependency
# tree is installed).  Stage 2 is a slim Python image with pacs installed, running as
# an unprivileged user.

FROM node:20-bookworm-slim AS ohif
WORKDIR /build
COPY scripts/fetch-ohif.sh scripts/fetch-ohif.sh
RUN scripts/fetch-ohif.sh --viewer-only

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed UID/GID so that bind-mounted folders can be given to it (README, "Docker").
ARG UID=10001
ARG GID=10001
RUN groupadd --system --gid "$GID" pacs \
 && useradd --system --uid "$UID" --gid pacs --home-dir /app --shell /usr/sbin/nologin pacs

# Dependencies first (a layer that survives source edits), then the package itself.
WORKDIR /src
COPY setup.cfg pyproject.toml README.md ./
COPY pacs ./pacs
COPY adapters ./adapters
RUN pip install . && rm -rf /src

COPY --from=ohif /build/vendor/ohif/dist /opt/ohif/dist

# /app/data: index (and objects with PACS_STORAGE=file); /dcmfiles: the upload folder.
WORKDIR /app
RUN mkdir -p /app/data /dcmfiles && chown pacs:pacs /app /app/data /dcmfiles
ENV PACS_DATA_DIR=/app/data \
    PACS_UPLOADS_DIR=/dcmfiles \
    PACS_VIEWER_DIST=/opt/ohif/dist \
    PACS_BIND_ADDRESS=0.0.0.0
VOLUME ["/app/data", "/dcmfiles"]
EXPOSE 32773 5985 8080

USER pacs
# GET /health on the DICOMweb port, from loopback (no credentials needed).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "-m", "pacs.node.healthcheck"]
CMD ["pacs", "serve"]
