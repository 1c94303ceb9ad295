"""pacs: a DIMSE-first PACS node."""

__version__ = "0.1.0"
