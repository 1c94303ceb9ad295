"""The protocol-free core: what a PACS node knows, whatever protocol asked.

- ``attributes``: THE attribute table (keyword, tag, level, VR, key type, column) and
  the patient/study/series/instance hierarchy;
- ``ingest`` (with ``analysers``, ``dataset``): receive one object — parse, prove,
  store, index, in the order that makes an acknowledgement durable;
- ``query`` / ``index``: the protocol-neutral ``Query``, its matching rules and engine /
  the SQLite index (schema from the attribute table, one writer, migrations);
- ``storage``: the object store (folder, S3) behind one small interface and the key layout;
- ``metadata``, ``frames``, ``transcode``, ``jsonmodel``: what retrieval serves;
- ``services``: the composition of all of these that every edge is given;
- ``config``, ``errors``, ``logs``: settings read once, the one exception tree, logging
  without patient data; ``health``, ``reconcile``: checks and repair of index and store.

The core imports no protocol framework (falcon, gunicorn, pynetdicom) and nothing from
the edges (:mod:`pacs.dimse`, :mod:`adapters`) or the node (:mod:`pacs.node`);
``tests/unit/test_layout.py`` checks it.
"""
