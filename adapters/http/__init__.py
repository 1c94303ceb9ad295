"""What the HTTP edges share: the access rule (``auth``).  Not an edge itself: the
DICOMweb and viewer applications both import it, and it imports neither of them."""

#: The WSGI environ key of a callable that tells whether the request's client has
#: closed its connection (``pacs.node.httpworker.ClientWatch``): long work for it (a
#: query) may stop.  Absent under another server: the work goes on.
CLIENT_GONE = "pacs.client_gone"
