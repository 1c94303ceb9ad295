"""What the HTTP edges share: the access rule (``auth``).  Not an edge itself: the
DICOMweb and viewer applications both import it, and it imports neither of them."""
