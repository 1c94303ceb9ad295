"""The node's process plumbing: serving, supervision, uploads, status.

``pacs serve`` (:mod:`pacs.cli`) starts the DIMSE workers (:mod:`pacs.dimse.server`),
the DICOMweb gunicorn (``webserver``, ``httpworker``, ``gunicorn_hooks``, ``apps``), and
the companions it supervises (``companions``: the viewer's gunicorn of ``viewer``, the
upload folder's watcher of ``uploads``).  ``apps`` composes the HTTP applications from
the edges and the core inside each worker; ``status`` and ``healthcheck`` report on a
running node.  The node may import the edges and the core; neither imports the node.
"""
