"""The protocol-neutral query engine: imports neither pynetdicom nor falcon."""

from pacs.core.query.engine import QueryEngine
from pacs.core.query.model import Constraint, InstanceRef, Match, Query, Result, Term

__all__ = ["Constraint", "InstanceRef", "Match", "Query", "QueryEngine", "Result", "Term"]
