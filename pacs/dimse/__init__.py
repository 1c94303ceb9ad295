"""The DIMSE edge: pynetdicom SCP handlers that translate to and from the core."""
