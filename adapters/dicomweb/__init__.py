"""The DICOMweb adapter (PS3.18): HTTP in, the core's query, retrieve and ingest calls,
HTTP out.  Falcon lives here and only here; ``pacs`` never imports it.

- ``app``: the route table, middleware and ``create_app(services)``;
- ``qido`` / ``search``: QIDO-RS resources / parameters to a core ``Query``;
- ``stow`` / ``multipart``: STOW-RS / the streaming multipart/related reader and writer;
- ``wado``, ``rendered``, ``accept``: WADO-RS retrieve, rendered images, Accept parsing;
- ``dicomjson``: index values to the DICOM JSON model; ``urls``: Retrieve URLs;
- ``errors``: THE exception → HTTP status / STOW failure reason table;
- ``browser``: CORS and Cross-Origin-Resource-Policy (who may call: :mod:`adapters.http.auth`).
"""
