"""The audit trail: who touched which patient's images, when, and with what outcome.

An audit trail is what a hospital shows an auditor (IHE ATNA, HIPAA): one event per
DICOMweb request and per DIMSE operation that touches patient data, apart from the
application log.  Events are the audit messages of PS3.15 A.5, written as JSON: the
element and attribute names of the DICOM audit message schema (PS3.15 A.5.1), coded
values as ``{"csd-code", "codeSystemName", "originalText"}`` (the schema's
``CodedValueType``), the event codes of PS3.16 CID 400-403.

=====================================  ========  =====================================
message (PS3.15)                       EventID   written for
=====================================  ========  =====================================
Query (A.5.3.10)                       110112    C-FIND, QIDO-RS
DICOM Instances Transferred (A.5.3.7)  110104    C-STORE, STOW-RS (C); C-MOVE, C-GET,
                                                 WADO-RS instances (R)
Begin Transferring DICOM Instances     110102    C-MOVE, C-GET, before the first
(A.5.3.3)                                        sub-operation
DICOM Instances Accessed (A.5.3.6)     110103    WADO-RS metadata, frames, bulk data,
                                                 rendered and thumbnail (R); instances
                                                 removed from a study that keeps
                                                 others (D)
DICOM Study Deleted (A.5.3.8)          110105    studies removed whole (D): ``pacs
                                                 delete``, DICOMweb DELETE and reject,
                                                 rejection notes, data retention
Import (A.5.3.5)                       110107    instances stored from files: ``pacs
                                                 import``, the upload folder (C)
Audit Log Used (A.5.3.2)               110101    ``pacs audit`` read the trail (R)
Security Alert (A.5.3.11)              110113    the trail itself: writing again after
                                                 events were lost (110134 "Audit
                                                 Recording Started"); an association
                                                 the access rules rejected, a client
                                                 address or user name locked out of
                                                 DICOMweb after failed logins (110126
                                                 "Node Authentication")
User Authentication (A.5.3.12)         110114    a failed DICOMweb login (110122
                                                 "Login"): wrong credentials
=====================================  ========  =====================================

The file (``PACS_AUDIT_LOG``, default ``<data folder>/audit.jsonl``) is one JSON
object per line, appended by every process of the node:

- **Patient data**: the trail holds the identifiers an auditor searches by (Study
  Instance UIDs, the Patient ID of the Patient participant object A.5 asks for) and, for
  a query, the query as A.5.3.10 asks (ParticipantObjectQuery: the C-FIND identifier,
  or the QIDO-RS path and query string, base64), which may name a patient.  No other
  data-set value is written (no names besides the query's, no birth dates).  It is
  therefore created with mode 0600 (an existing file keeps the mode its owner gave it,
  e.g. by logrotate's ``create``) and must be protected as the index is; the
  application log, by contrast, never holds patient data at INFO and above.
- **Atomic lines**: each event is one ``write`` of a whole line on a descriptor opened
  with ``O_APPEND``: the kernel appends it in one piece, so the DIMSE workers and the
  gunicorn workers of a node never interleave their lines.  There is no buffer in the
  process, so an event written survives a crash of the process (``kill -9``) at once.
- **Durability**: no fsync per event (it would add a disk flush to every request);
  a thread of each writing process calls ``fdatasync`` at most once per
  :data:`SYNC_SECONDS` when something was written, so a power loss costs at most the
  last second of events, as with the system's own logs.
- **Rotation**: the file is renamed or removed by logrotate (or copied and truncated);
  every :data:`CHECK_SECONDS` a writer compares the path's inode with that of its
  descriptor and reopens it when they differ.  No signal is needed (gunicorn takes
  SIGHUP for itself).
- **Failures never stop the node**: a file that cannot be opened or written (full
  disk, permissions, read-only file system) is logged at ERROR once, each lost event is
  counted, and the request is answered as usual; a modality whose studies stopped
  reaching the radiologist because the audit disk filled would be worse for patients
  than a gap in the trail.  When writing works again, a Security Alert event records
  the gap (how many events were lost, since when) in the trail itself, and a WARNING in
  the application log.  The failure is visible from outside the process too: ``GET
  /health`` and ``pacs status`` report whether the trail's file can be opened for
  appending and its disk has room (:func:`writable`), and the events this process lost.
  They do not make the node unhealthy: a health check that failed would take the node
  out of service, which is what failing open avoids.
- **Refusals are coalesced**: a peer refused again and again (rejected associations,
  failed logins, DICOMweb requests refused 401 / 403 / 421 / 429, DIMSE requests
  refused 0124) would otherwise add a line per attempt, without bound, and could fill
  the disk.  The first refusal of a kind (event type, action, outcome) from a source
  (the requestors' address and the name claimed there: calling AE title, user name) is
  written at once; the next ones within :data:`COALESCE_SECONDS` are counted, and one
  record when that window ends (written with the process's next event, its sync
  thread's next round, or when it stops) says how many there were and until when
  (:class:`Coalescer`).  A flood thus costs two lines per source and kind per minute in
  each process; past :data:`MAX_IDENTITIES` names from one address, its other names
  share one run, and past :data:`MAX_SOURCES` sources at once, the others share one run
  per kind.  Only failures the edges call refusals are
  coalesced: every access to patient data that succeeded, and every other failure, is
  written whole.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import datetime
import errno
import json
import logging
import os
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from pacs.core.index import reads

log = logging.getLogger(__name__)

#: Seconds between two fdatasync calls of a process that writes events.
SYNC_SECONDS = 1.0
#: Seconds between two checks that the path still names the file being written.
CHECK_SECONDS = 1.0
#: A value of the ``PACS_AUDIT_LOG`` setting that turns the trail off.
OFF = "off"
#: The file name of the trail in the data folder when ``PACS_AUDIT_LOG`` is empty.
DEFAULT_NAME = "audit.jsonl"
#: Seconds over which repeated refusals of one kind from one source are one record.
COALESCE_SECONDS = 60.0
#: Most sources whose refusals are coalesced at a time (per process): what the
#: coalescing holds (the first event of each, a few KiB at most) stays bounded however
#: many addresses a flood comes from.
MAX_SOURCES = 1000
#: The source of the refusals coalesced together past :data:`MAX_SOURCES`.
OTHER_SOURCES = "(other sources)"
#: Most names (calling AE titles, user names) refused from one address whose refusals
#: are coalesced apart, per kind and window: each is recorded, yet trying one name
#: after another from one address cannot grow the trail without bound.
MAX_IDENTITIES = 10
#: The name of the refusals of an address past :data:`MAX_IDENTITIES` names.
OTHER_IDENTITIES = "(other names)"

Event = dict[str, Any]


class Code(NamedTuple):
    """A coded value (the schema's ``CodedValueType``: csd-code, codeSystemName,
    originalText)."""

    code: str
    system: str
    text: str

    def as_json(self) -> dict[str, str]:
        """The code as the JSON object of an event."""
        return {"csd-code": self.code, "codeSystemName": self.system,
                "originalText": self.text}


# --- PS3.16 CID 400 Audit Event ID, CID 402 Audit Active Participant Role ID Code,
# --- CID 403 Security Alert Type, CID 404 Audit Participant Object ID Type Code -------

QUERY = Code("110112", "DCM", "Query")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
BEGIN_TRANSFERRING = Code("110102", "DCM", "Begin Transferring DICOM Instances")
INSTANCES_ACCESSED = Code("110103", "DCM", "DICOM Instances Accessed")
STUDY_DELETED = Code("110105", "DCM", "DICOM Study Deleted")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
AUDIT_RECORDING_STARTED = Code("110134", "DCM", "Audit Recording Started")
NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
RESTRICTED_FUNCTION = Code("110132", "DCM", "Use of Restricted Function")
USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")
IMPORT = Code("110107", "DCM", "Import")
AUDIT_LOG_USED = Code("110101", "DCM", "Audit Log Used")
LOGIN = Code("110122", "DCM", "Login")
SOURCE_ROLE = Code("110153", "DCM", "Source Role ID")
DESTINATION_ROLE = Code("110152", "DCM", "Destination Role ID")
SOURCE_MEDIA = Code("110155", "DCM", "Source Media")
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
SOP_CLASS_UID = Code("110181", "DCM", "SOP Class UID")
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
#: ParticipantObjectIDTypeCode of an object named by its URI (RFC 3881 5.5.4): the
#: audit log of an Audit Log Used event (PS3.15 A.5.3.2).
URI = Code("12", "RFC-3881", "URI")
#: PS3.16 CID 405 Media Type Code of files read from a file system (their ``file:``
#: URI): the Source Media of a Data Import (PS3.15 A.5.3.5); none of CID 405's removable
#: media can be told from a folder.
URI_MEDIA = Code("110037", "DCM", "URI")
#: Audit Source Type Code (RFC 3881 5.4.3, which PS3.15 A.5.1 keeps): web server process.
WEB_SERVER = Code("3", "RFC-3881", "Web Server Process")
#: Application server process (the DIMSE workers).
APPLICATION_SERVER = Code("4", "RFC-3881", "Application Server Process")

#: EventActionCode values (RFC 3881 5.1.2).
CREATE, READ, UPDATE, DELETE, EXECUTE = "C", "R", "U", "D", "E"

#: EventOutcomeIndicator values (PS3.15 A.5.3, RFC 3881 5.1.4).
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12

#: NetworkAccessPointTypeCode values (RFC 3881 5.3.5).
MACHINE_NAME, IP_ADDRESS = 1, 2

#: ParticipantObjectTypeCode and ParticipantObjectTypeCodeRole values (RFC 3881 5.5.1-2).
PERSON, SYSTEM_OBJECT = 1, 2
PATIENT_ROLE, REPORT_ROLE, SECURITY_RESOURCE_ROLE = 1, 3, 13
#: ParticipantObjectName of the audit log in an Audit Log Used event (PS3.15 A.5.3.2).
SECURITY_AUDIT_LOG = "Security Audit Log"


def utc_now() -> str:
    """The EventDateTime of now: UTC, ISO 8601 with microseconds and ``Z``."""
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    return now.isoformat(timespec="microseconds") + "Z"


# --- who, what --------------------------------------------------------------------------

@dataclass(frozen=True)
class Participant:
    """One ActiveParticipant: a user or process taking part in the event.

    Attributes
    ----------
    user_id :
        UserID: an AE title, an HTTP user name, ``token`` or ``loopback``.
    requestor :
        UserIsRequestor: this participant asked for the event.
    role :
        RoleIDCode (source or destination of the data), if it has one.
    address :
        NetworkAccessPointID: the IP address (or host name) of the participant.
    alternative_user_id :
        AlternativeUserID: e.g. a TLS client certificate's subject.
    user_name :
        UserName.
    media :
        MediaIdentifier's MediaType (PS3.16 CID 405): the participant is media, the
        Source Media of a Data Import (PS3.15 A.5.3.5).
    """

    user_id: str
    requestor: bool
    role: Code | None = None
    address: str = ""
    alternative_user_id: str = ""
    user_name: str = ""
    media: Code | None = None

    def as_json(self) -> dict[str, Any]:
        """The ActiveParticipant element."""
        item: dict[str, Any] = {"UserID": self.user_id, "UserIsRequestor": self.requestor}
        if self.alternative_user_id:
            item["AlternativeUserID"] = self.alternative_user_id
        if self.user_name:
            item["UserName"] = self.user_name
        if self.role is not None:
            item["RoleIDCode"] = self.role.as_json()
        if self.media is not None:
            item["MediaIdentifier"] = {"MediaType": self.media.as_json()}
        if self.address:
            item["NetworkAccessPointTypeCode"] = (
                IP_ADDRESS if _is_ip(self.address) else MACHINE_NAME)
            item["NetworkAccessPointID"] = self.address
        return item

    def acting_as(self, role: Code | None) -> Participant:
        """This participant in ``role``."""
        return dataclasses.replace(self, role=role)


def _is_ip(address: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, address.split("%")[0])
        except OSError:
            continue
        return True
    return False


@dataclass(frozen=True)
class Study:
    """A study taking part in the event, with its SOP classes and instance counts
    when known (ParticipantObjectDescription, SOPClass with NumberOfInstances)."""

    uid: str
    sop_classes: Mapping[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The ParticipantObjectIdentification of the study (PS3.15 A.5.3.7)."""
        item: dict[str, Any] = {
            "ParticipantObjectID": self.uid,
            "ParticipantObjectTypeCode": SYSTEM_OBJECT,
            "ParticipantObjectTypeCodeRole": REPORT_ROLE,
            "ParticipantObjectIDTypeCode": STUDY_INSTANCE_UID.as_json(),
        }
        if self.sop_classes:
            item["ParticipantObjectDescription"] = {"SOPClass": [
                {"UID": uid, "NumberOfInstances": count}
                for uid, count in sorted(self.sop_classes.items())]}
        return item


@dataclass(frozen=True)
class Patient:
    """The patient of the studies of an event: Patient ID, and its issuer when known."""

    patient_id: str
    issuer: str = ""

    def as_json(self) -> dict[str, Any]:
        """The ParticipantObjectIdentification of the patient (PS3.15 A.5.3.7): the ID
        in HL7 CX form (``ID^^^Issuer``); no name (it is optional, and the ID is what
        an auditor searches by)."""
        cx = f"{self.patient_id}^^^{self.issuer}" if self.issuer else self.patient_id
        return {
            "ParticipantObjectID": cx,
            "ParticipantObjectTypeCode": PERSON,
            "ParticipantObjectTypeCodeRole": PATIENT_ROLE,
            "ParticipantObjectIDTypeCode": PATIENT_NUMBER.as_json(),
        }


def studies_of(pairs: Iterable[tuple[str, str]]) -> list[Study]:
    """Studies from (Study Instance UID, SOP Class UID) pairs, one per instance, with
    the instances counted per SOP class; in the order first seen."""
    counts: dict[str, dict[str, int]] = {}
    for study_uid, sop_class in pairs:
        classes = counts.setdefault(study_uid, {})
        if sop_class:
            classes[sop_class] = classes.get(sop_class, 0) + 1
    return [Study(uid, classes) for uid, classes in counts.items()]


def studies_by_patient(instances: Iterable[tuple[str, str, Patient | None]]
                       ) -> dict[Patient | None, list[Study]]:
    """Studies grouped by the patient each instance named, from (Study Instance UID,
    SOP Class UID, patient) of each instance (:func:`studies_of` per patient).

    What the instances themselves say, not the index: a study may hold instances of
    more than one Patient ID, and the index keeps one patient per study (its last
    writer's), so a lookup there would name the wrong patient for the others.
    """
    pairs: dict[Patient | None, list[tuple[str, str]]] = {}
    for study_uid, sop_class, patient in instances:
        pairs.setdefault(patient, []).append((study_uid, sop_class))
    return {patient: studies_of(group) for patient, group in pairs.items()}


@dataclass(frozen=True)
class Source:
    """AuditSourceIdentification: which node wrote the event.

    Attributes
    ----------
    source_id :
        AuditSourceID: the node's AE title.
    site :
        AuditEnterpriseSiteID: the customer.
    """

    source_id: str
    site: str

    def as_json(self, kind: Code) -> dict[str, Any]:
        """The AuditSourceIdentification element, of type ``kind`` (web or application
        server process)."""
        return {"AuditSourceID": self.source_id, "AuditEnterpriseSiteID": self.site,
                "AuditSourceTypeCode": [kind.as_json()]}


# --- the messages of PS3.15 A.5.3 ----------------------------------------------------

def _identification(event_id: Code, action: str, outcome: int, description: str,
                    type_code: Code | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"EventID": event_id.as_json(), "EventActionCode": action,
                            "EventDateTime": utc_now(), "EventOutcomeIndicator": outcome}
    if type_code is not None:
        item["EventTypeCode"] = [type_code.as_json()]
    if description:
        item["EventOutcomeDescription"] = description
    return item


def _message(identification: dict[str, Any], participants: Sequence[Participant],
             source: Source, kind: Code, objects: Sequence[dict[str, Any]]) -> Event:
    event: Event = {
        "EventIdentification": identification,
        "ActiveParticipant": [p.as_json() for p in participants],
        "AuditSourceIdentification": source.as_json(kind),
    }
    if objects:
        event["ParticipantObjectIdentification"] = list(objects)
    return event


def _data_objects(studies: Sequence[Study], patient: Patient | None) -> list[dict[str, Any]]:
    objects = [study.as_json() for study in studies]
    if patient is not None:
        objects.append(patient.as_json())
    return objects


#: Most bytes of a query written into its event: an identifier may be up to a MiB
#: (:data:`pacs.dimse.limits.IDENTIFIER_CEILING`), and a run of refusals keeps its first
#: event in memory (:class:`Refusals`); the keys searched by are always all there.
MAX_AUDITED_QUERY = 64 << 10


def query_event(source: Source, kind: Code, requestor: Participant, responder: Participant,
                sop_class: str, query: bytes, keys: Sequence[str], outcome: int,
                description: str = "", transfer_syntax: str = "",
                size: int | None = None) -> Event:
    """Query (PS3.15 A.5.3.10): ``requestor`` asked ``responder``.

    Parameters
    ----------
    sop_class : str
        ParticipantObjectID of the SOP Queried: the information model's FIND SOP Class.
    query : bytes
        ParticipantObjectQuery: the identifier as received (C-FIND), or the path and
        query string (QIDO-RS); written base64 as A.5.3.10 asks.  A longer one than
        :data:`MAX_AUDITED_QUERY` is cut there, its whole length in a
        ParticipantObjectDetail ``QueryBytes``.
    size : int, optional
        The query's length as it arrived, when ``query`` holds less of it (an
        identifier over its ceiling is counted, not kept); also in ``QueryBytes``.
    keys : sequence of str
        The tags of the query's keys (``00100010``, ``00081032.00080100`` for an item
        key), as a ParticipantObjectDetail ``QueryKeys``: what was searched by, without
        the values.
    transfer_syntax : str
        ParticipantObjectDetail ``TransferSyntax`` of the identifier (A.5.3.10: required
        when the query is a DICOM data set).
    """
    details = [{"type": "QueryKeys", "value": "\\".join(keys)}]
    if transfer_syntax:
        details.insert(0, {"type": "TransferSyntax", "value": transfer_syntax})
    size = len(query) if size is None else size
    if size > min(len(query), MAX_AUDITED_QUERY):
        details.append({"type": "QueryBytes", "value": str(size)})
        query = query[:MAX_AUDITED_QUERY]
    queried = {
        "ParticipantObjectID": sop_class,
        "ParticipantObjectTypeCode": SYSTEM_OBJECT,
        "ParticipantObjectTypeCodeRole": REPORT_ROLE,
        "ParticipantObjectIDTypeCode": SOP_CLASS_UID.as_json(),
        "ParticipantObjectQuery": base64.b64encode(query).decode("ascii"),
        "ParticipantObjectDetail": details,
    }
    return _message(_identification(QUERY, EXECUTE, outcome, description),
                    [requestor.acting_as(SOURCE_ROLE), responder.acting_as(DESTINATION_ROLE)],
                    source, kind, [queried])


def transferred_event(source: Source, kind: Code, action: str, sender: Participant,
                      receiver: Participant, studies: Sequence[Study],
                      patient: Patient | None, outcome: int, description: str = "",
                      others: Sequence[Participant] = ()) -> Event:
    """DICOM Instances Transferred (PS3.15 A.5.3.7): ``sender`` sent ``studies`` to
    ``receiver`` (``action`` C when the node received them, U when they replaced
    different objects it held, R when it sent them or held them already);
    ``others`` are third parties, e.g. the requestor of a C-MOVE."""
    participants = [sender.acting_as(SOURCE_ROLE), receiver.acting_as(DESTINATION_ROLE),
                    *(other.acting_as(None) for other in others)]
    return _message(_identification(INSTANCES_TRANSFERRED, action, outcome, description),
                    participants, source, kind, _data_objects(studies, patient))


def begin_transferring_event(source: Source, kind: Code, sender: Participant,
                             receiver: Participant, studies: Sequence[Study],
                             patient: Patient | None, outcome: int = SUCCESS,
                             description: str = "",
                             others: Sequence[Participant] = ()) -> Event:
    """Begin Transferring DICOM Instances (PS3.15 A.5.3.3): the intent, before the
    first instance leaves (compared with the DICOM Instances Transferred that
    follows)."""
    participants = [sender.acting_as(SOURCE_ROLE), receiver.acting_as(DESTINATION_ROLE),
                    *(other.acting_as(None) for other in others)]
    return _message(_identification(BEGIN_TRANSFERRING, EXECUTE, outcome, description),
                    participants, source, kind, _data_objects(studies, patient))


def accessed_event(source: Source, kind: Code, action: str,
                   participants: Sequence[Participant], studies: Sequence[Study],
                   patient: Patient | None, outcome: int, description: str = "") -> Event:
    """DICOM Instances Accessed (PS3.15 A.5.3.6): ``participants`` (the person or
    process manipulating the data, and the node) read (R) or deleted (D) ``studies``."""
    return _message(_identification(INSTANCES_ACCESSED, action, outcome, description),
                    participants, source, kind, _data_objects(studies, patient))


def study_deleted_event(source: Source, kind: Code, participants: Sequence[Participant],
                        studies: Sequence[Study], patient: Patient | None, outcome: int,
                        description: str = "") -> Event:
    """DICOM Study Deleted (PS3.15 A.5.3.8): ``participants`` (the requestor, and the
    node) removed ``studies`` whole, with all their instances."""
    return _message(_identification(STUDY_DELETED, DELETE, outcome, description),
                    participants, source, kind, _data_objects(studies, patient))


def security_alert_event(source: Source, kind: Code, alert: Code, node: Participant,
                         description: str, outcome: int = SUCCESS,
                         others: Sequence[Participant] = ()) -> Event:
    """Security Alert (PS3.15 A.5.3.11) of type ``alert`` (CID 403), reported by the
    node itself (``node``: the reporting process, its requestor), with the ``others``
    it concerns (the peer that was refused)."""
    return _message(_identification(SECURITY_ALERT, EXECUTE, outcome, description, alert),
                    [node, *others], source, kind, [])


def user_authentication_event(source: Source, kind: Code, user: Participant,
                              node: Participant, outcome: int,
                              description: str = "") -> Event:
    """User Authentication (PS3.15 A.5.3.12) of a login (110122): the person
    authenticated or claimed (``user``, with the address it called from) and the node
    that authenticated it; no participant objects."""
    return _message(_identification(USER_AUTHENTICATION, EXECUTE, outcome, description,
                                     LOGIN), [user, node], source, kind, [])


def source_media(uri: str, media: Code = URI_MEDIA) -> Participant:
    """The Source Media of a Data Import (PS3.15 A.5.3.5): ``uri`` names it (a folder, or
    a host's file system), ``media`` is its type (CID 405)."""
    return Participant(uri, False, SOURCE_MEDIA, media=media)


def import_event(source: Source, kind: Code, importers: Sequence[Participant],
                 media: Participant, studies: Sequence[Study], patient: Patient | None,
                 outcome: int, description: str = "") -> Event:
    """Data Import (PS3.15 A.5.3.5, EventID 110107 "Import", action C): ``importers``
    (the person or process importing, Destination Role ID; the requestor among them)
    stored ``studies`` of ``patient`` read from ``media`` (:func:`source_media`)."""
    participants = [*(importer.acting_as(DESTINATION_ROLE) for importer in importers),
                    media.acting_as(SOURCE_MEDIA)]
    return _message(_identification(IMPORT, CREATE, outcome, description), participants,
                    source, kind, _data_objects(studies, patient))


def audit_log_used_event(source: Source, kind: Code, reader: Participant,
                         application: Participant, log_uri: str, outcome: int = SUCCESS,
                         description: str = "",
                         details: Mapping[str, str] | None = None) -> Event:
    """Audit Log Used (PS3.15 A.5.3.2, EventID 110101, action R): ``reader`` (the person
    who asked, the requestor) read the trail at ``log_uri`` through ``application``
    (the node's process).  The log is the one participant object A.5.3.2 asks for: a
    system object (2) of role Security Resource (13), identified by its URI (12), named
    "Security Audit Log"; ``details`` (ParticipantObjectDetail, by type) say how it was
    read (the filters given)."""
    log_object: dict[str, Any] = {
        "ParticipantObjectID": log_uri,
        "ParticipantObjectTypeCode": SYSTEM_OBJECT,
        "ParticipantObjectTypeCodeRole": SECURITY_RESOURCE_ROLE,
        "ParticipantObjectIDTypeCode": URI.as_json(),
        "ParticipantObjectName": SECURITY_AUDIT_LOG,
    }
    if details:
        log_object["ParticipantObjectDetail"] = [{"type": detail_type, "value": value}
                                                 for detail_type, value in details.items()]
    return _message(_identification(AUDIT_LOG_USED, READ, outcome, description),
                    [reader, application], source, kind, [log_object])


def batch_outcome(done: int, failed: int) -> int:
    """EventOutcomeIndicator of a batch (an association's C-STOREs, an import, a
    forwarded batch) as a whole: success when nothing failed, a minor failure when some
    did, a serious one when nothing was done (PS3.15 A.5.1 keeps RFC 3881 5.1.4's)."""
    return SUCCESS if not failed else MINOR_FAILURE if done else SERIOUS_FAILURE


def dimse_outcome(status: int) -> int:
    """EventOutcomeIndicator of a DIMSE status (PS3.7 C): Success 0; Warning (0001,
    Bxxx, 0107, 0116) and Cancel (FE00) a minor failure; any Failure a serious one."""
    if status == 0x0000:
        return SUCCESS
    if status in (0x0001, 0x0107, 0x0116, 0xFE00) or status >> 12 == 0xB:
        return MINOR_FAILURE
    return SERIOUS_FAILURE


# --- the writer ---------------------------------------------------------------------

def encode(event: Mapping[str, Any]) -> bytes:
    """One event as one line of UTF-8 JSON, newline included."""
    return (json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def audit_path(setting: str, data_dir: Path) -> Path | None:
    """The trail's file for ``PACS_AUDIT_LOG``: empty, the data folder's ``audit.jsonl``;
    ``off``, none; otherwise the path given (relative to the working folder)."""
    value = setting.strip()
    if value.lower() == OFF:
        return None
    if not value:
        return data_dir / DEFAULT_NAME
    return Path(value).absolute()


class AuditLog:
    """Appends events to the trail's file: one ``write`` per event, shared by every
    process of the node (see the module docstring for the guarantees).

    Thread-safe; each process that writes opens its own descriptor and runs its own
    sync thread, so an instance that crossed ``fork()`` keeps working.

    Parameters
    ----------
    path : Path or None
        The file; ``None`` writes nothing (``PACS_AUDIT_LOG=off``).
    sync_seconds, check_seconds : float
        :data:`SYNC_SECONDS` and :data:`CHECK_SECONDS` (tests shorten them).
    """

    def __init__(self, path: Path | None, *, sync_seconds: float = SYNC_SECONDS,
                 check_seconds: float = CHECK_SECONDS) -> None:
        self.path = path
        self.sync_seconds = sync_seconds
        self.check_seconds = check_seconds
        self.written = 0
        self.dropped = 0
        self._dropped_since = ""
        self._torn = False
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self._checked = 0.0
        self._dirty = False
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        self.on_resume: Callable[[int, str], Mapping[str, Any]] | None = None
        #: Called by the sync thread at each round (the trail writes the records of
        #: coalesced refusals whose window ended).
        self.on_tick: Callable[[], None] | None = None

    @property
    def enabled(self) -> bool:
        """True when events are written somewhere."""
        return self.path is not None

    def write(self, event: Mapping[str, Any]) -> bool:
        """Append one event; False when it could not be written (counted in
        :attr:`dropped`, never raised)."""
        if self.path is None:
            return False
        line = encode(event)
        self._after_fork()
        with self._lock:
            try:
                fd = self._descriptor()
                if self.dropped:
                    self._resume(fd)
                self._append(fd, line)
            except OSError as exc:
                self._lost(exc)
                return False
            self.written += 1
            self._dirty = True
        self._start_syncer()
        return True

    def _append(self, fd: int, line: bytes) -> None:
        if self._torn:  # a line cut short by a full disk: end it before this one
            line = b"\n" + line
        written = os.write(fd, line)
        self._torn = False
        if written != len(line):
            # Only a full disk (or a quota) cuts a regular file's write short.
            self._torn = True
            raise OSError(errno.ENOSPC, "audit line cut short")

    def _resume(self, fd: int) -> None:
        """Writing works again: record the gap in the trail first (and in the log)."""
        lost, since = self.dropped, self._dropped_since
        if self.on_resume is not None:
            self._append(fd, encode(self.on_resume(lost, since)))  # may fail again
        self.dropped, self._dropped_since = 0, ""
        log.warning("audit trail %s: writing again; %d event(s) since %s were lost",
                    self.path, lost, since)

    def _lost(self, exc: OSError) -> None:
        if not self.dropped:
            self._dropped_since = utc_now()
            log.error("audit trail %s cannot be written (%s); events are counted and "
                      "dropped until it can, and the node goes on serving", self.path,
                      os.strerror(exc.errno) if exc.errno else type(exc).__name__)
        self.dropped += 1
        self._close_descriptor()  # opened again on the next event: it may be fixed

    def _descriptor(self) -> int:
        """The descriptor of the file the path names now (opened, or reopened after a
        rotation, at most every ``check_seconds``)."""
        assert self.path is not None
        now = time.monotonic()
        if self._fd is not None and now - self._checked < self.check_seconds:
            return self._fd
        self._checked = now
        if self._fd is not None:
            try:
                current = os.stat(self.path)
                if (current.st_dev, current.st_ino) == self._identity:
                    return self._fd
            except FileNotFoundError:
                pass
            self._close_descriptor()  # rotated away: the events go to the new file
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        stat = os.fstat(fd)
        self._fd, self._identity = fd, (stat.st_dev, stat.st_ino)
        return fd

    def _close_descriptor(self) -> None:
        if self._fd is not None:
            fd, self._fd, self._identity = self._fd, None, None
            with contextlib.suppress(OSError):
                if self._dirty:
                    os.fdatasync(fd)
                self._dirty = False
            with contextlib.suppress(OSError):
                os.close(fd)

    def _after_fork(self) -> None:
        """In a child that inherited this writer: a lock of its own, no sync thread
        yet; the inherited descriptor (O_APPEND) stays usable."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._stop = threading.Event()
            self._syncer = None

    def _start_syncer(self) -> None:
        # Started under the lock, so :meth:`close` never sees a thread not yet started;
        # none once closed.
        if self._syncer is None and self.sync_seconds > 0:
            with self._lock:
                if self._syncer is None and not self._stop.is_set():
                    self._syncer = threading.Thread(target=self._sync_loop, daemon=True,
                                                    name="audit-sync")
                    self._syncer.start()

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.sync_seconds):
            if self.on_tick is not None:
                try:
                    self.on_tick()
                except Exception:  # the thread outlives whatever its callback meets
                    log.error("audit trail: coalesced refusals could not be recorded",
                              exc_info=True)
            self.sync()

    def sync(self) -> None:
        """fdatasync what was written since the last sync (outside the lock, on a
        duplicate of the descriptor, so writers never wait for the disk)."""
        with self._lock:
            if not self._dirty or self._fd is None:
                return
            self._dirty = False
            try:
                fd = os.dup(self._fd)
            except OSError:
                return
        try:
            os.fdatasync(fd)
        except OSError as exc:
            log.warning("audit trail %s: fdatasync failed: %s", self.path,
                        os.strerror(exc.errno) if exc.errno else type(exc).__name__)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Stop the sync thread, sync and close the file."""
        with self._lock:
            self._stop.set()
            syncer = self._syncer
        if syncer is not None and syncer is not threading.current_thread():
            syncer.join(timeout=5)
        with self._lock:
            self._close_descriptor()


# --- refusals coalesced -----------------------------------------------------------------

class RefusalKey(NamedTuple):
    """What makes refusals "the same" for coalescing (:func:`refusal_key`)."""

    address: str
    identity: str
    kind: str
    #: The event's other participants (a C-MOVE's destination, the node): a refused
    #: C-MOVE to one AE is not counted as more of a refused C-GET.
    others: str = ""


def refusal_key(event: Mapping[str, Any]) -> RefusalKey:
    """The source of a refusal, the addresses of the event's requestors, and who they
    claimed to be there (their UserIDs: the calling AE title, the user name), its kind
    (EventID, EventTypeCode, EventActionCode, EventOutcomeIndicator), and its other
    participants (UserID and role)."""
    identification = event.get("EventIdentification", {})
    kind = "|".join((
        str(identification.get("EventID", {}).get("csd-code", "")),
        ",".join(str(code.get("csd-code", ""))
                 for code in identification.get("EventTypeCode", ())),
        str(identification.get("EventActionCode", "")),
        str(identification.get("EventOutcomeIndicator", ""))))
    participants = event.get("ActiveParticipant", ())
    requestors = [p for p in participants if p.get("UserIsRequestor")]
    address = ",".join(sorted(str(p.get("NetworkAccessPointID", "")) for p in requestors))
    identity = ",".join(sorted(str(p.get("UserID", "")) for p in requestors))
    others = ",".join(sorted(
        f"{p.get('UserID', '')}/{(p.get('RoleIDCode') or {}).get('csd-code', '')}"
        for p in participants if not p.get("UserIsRequestor")))
    return RefusalKey(address, identity, kind, others)


@dataclass
class Run:
    """Refusals of one kind from one source within one window.

    Attributes
    ----------
    key : RefusalKey
        Whose they are (its identity :data:`OTHER_IDENTITIES`, or its address
        :data:`OTHER_SOURCES`, for the runs that stand for many).
    first : Event
        The first of them, written when it came.
    started : float
        When it came (the clock of :class:`Coalescer`).
    count : int
        How many more came within the window (counted, not written).
    last : str
        The EventDateTime of the last of those.
    """

    key: RefusalKey
    first: Event
    started: float
    count: int = 0
    last: str = ""

    @property
    def sources(self) -> str:
        """Whose refusals the run counts, for its record."""
        if self.key.address == OTHER_SOURCES:
            return "from sources past the coalescing's limit"
        if self.key.identity == OTHER_IDENTITIES:
            return "from this address, under other names than those recorded apart"
        return "from this source"


class Coalescer:
    """Which refusals to write: the first of each source and kind in a window, the
    rest counted (see the module docstring).  Thread-safe; one per process.

    A source is an address and the name claimed there: each AE title or user name
    refused has its own record, up to ``identities`` names per address and kind in a
    window; the address's other names share one run, so that trying name after name
    does not grow the trail either.

    Parameters
    ----------
    window : float
        :data:`COALESCE_SECONDS`.
    limit : int
        :data:`MAX_SOURCES`.
    identities : int
        :data:`MAX_IDENTITIES`.
    clock : callable
        Seconds, monotonic (tests give their own).
    """

    def __init__(self, window: float = COALESCE_SECONDS, limit: int = MAX_SOURCES,
                 identities: int = MAX_IDENTITIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.limit = limit
        self.identities = identities
        self.clock = clock
        self._pid = os.getpid()
        self._lock = threading.Lock()
        # In the order their windows began, so the ended ones are always first.
        self._runs: dict[RefusalKey, Run] = {}
        # Names with runs of their own per (address, kind), and how many runs each has
        # (one per set of other participants, up to ``identities``).
        self._named: dict[tuple[str, str], dict[str, int]] = {}

    def _after_fork(self) -> None:
        """In a child that inherited this coalescer: a lock of its own (the parent's
        may have been held by a thread that did not cross), and no runs (the parent
        records those)."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._runs, self._named = {}, {}

    def admit(self, event: Event) -> bool:
        """True when ``event`` is to be written now: the first of its source and kind
        in a window; otherwise it is counted in its run."""
        key = refusal_key(event)
        self._after_fork()
        with self._lock:
            key = self._run_key(key)
            run = self._runs.get(key)
            if run is None:
                self._runs[key] = Run(key, event, self.clock())
                if key.identity != OTHER_IDENTITIES and key.address != OTHER_SOURCES:
                    names = self._named.setdefault((key.address, key.kind), {})
                    names[key.identity] = names.get(key.identity, 0) + 1
                return True
            run.count += 1
            run.last = str(event.get("EventIdentification", {}).get("EventDateTime", ""))
            return False

    def _run_key(self, key: RefusalKey) -> RefusalKey:
        """The run ``key`` counts in: its own, its address's other names', or that of
        the sources past the limit (under the lock)."""
        if key in self._runs:
            return key
        if len(self._runs) >= self.limit:
            return RefusalKey(OTHER_SOURCES, "", key.kind)
        names = self._named.get((key.address, key.kind), {})
        if key.identity not in names and len(names) >= self.identities:
            return RefusalKey(key.address, OTHER_IDENTITIES, key.kind)
        if names.get(key.identity, 0) >= self.identities:
            # A name naming a new C-MOVE destination each time: its runs past the bound
            # share one without the other participants.
            return key._replace(others="")
        return key

    def ended(self, everything: bool = False) -> list[Run]:
        """The runs whose window has passed (``everything``: all of them), forgotten
        here; those that counted refusals are returned, for their record."""
        now = self.clock()
        ended: list[Run] = []
        self._after_fork()
        with self._lock:
            while self._runs:
                key, run = next(iter(self._runs.items()))
                if not everything and now - run.started < self.window:
                    break
                del self._runs[key]
                self._forget_name(key)
                if run.count:
                    ended.append(run)
        return ended

    def _forget_name(self, key: RefusalKey) -> None:
        """A run of its own ended: one name fewer for its address (under the lock)."""
        if key.identity == OTHER_IDENTITIES or key.address == OTHER_SOURCES:
            return
        names = self._named.get((key.address, key.kind), {})
        left = names.get(key.identity, 0) - 1
        if left > 0:
            names[key.identity] = left
        else:
            names.pop(key.identity, None)
        if not names:
            self._named.pop((key.address, key.kind), None)


def coalesced_event(run: Run) -> Event:
    """The record of the refusals a run counted: its first event (participants and
    objects, which a message of its type requires), dated at the last refusal, with
    their number and time span after the first one's reason in
    EventOutcomeDescription.  The refusals counted may have named other studies or
    queries (or user names): the description says that the objects are the first
    one's."""
    event = copy.deepcopy(run.first)
    identification = event["EventIdentification"]
    first = identification.get("EventDateTime", "")
    identification["EventDateTime"] = run.last or first
    reason = identification.get("EventOutcomeDescription")
    identification["EventOutcomeDescription"] = (
        (f"{reason}; " if reason else "")
        + f"{run.count} more refusal(s) of this kind {run.sources} after the one "
        f"recorded at {first}, until {run.last}, coalesced into this record (its "
        f"participants and objects are those of the first)")
    return event


def writable(path: Path | None) -> str:
    """Whether the trail's file can be written now, from any process: ``ok``,
    ``off``, or what stands in the way (the file cannot be opened for appending, or
    its disk has no room left).  Nothing is written; the file is not created."""
    if path is None:
        return OFF
    target = path if path.exists() else path.parent
    try:
        if path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))
        elif not os.access(target, os.W_OK | os.X_OK):
            return f"cannot be written: {target} is not a writable folder"
        if os.statvfs(target).f_bavail == 0:
            return "cannot be written: its disk is full"
    except OSError as exc:
        return f"cannot be written: {os.strerror(exc.errno) if exc.errno else exc}"
    return "ok"


# --- the trail: events built, grouped per patient, written ----------------------------

PatientLookup = Callable[[Sequence[str]], Mapping[str, Patient]]


class AuditTrail:
    """What the edges call: builds the PS3.15 A.5 messages and writes them.

    Events that name studies are written once per patient (A.5.3.3, A.5.3.6 and
    A.5.3.7 "may only include information about a single patient"): the instances
    received are grouped by the patient each of them named (:meth:`received`); the
    studies read, sent or removed by the Patient ID the index holds for them
    (``patients``), which is one per study: the last stored instance's, whatever
    Patient IDs the study's other instances hold.  Studies the index does not know go
    into one event without a Patient object.

    Parameters
    ----------
    log : AuditLog
        Where the events go.
    source : Source
        The node (AE title, customer).
    patients : callable, optional
        Study Instance UIDs to their :class:`Patient` (:func:`patients_in_index`);
        never raises for the trail's sake (a failure means "unknown").
    refusals : Coalescer, optional
        What coalesces refusals (a new :class:`Coalescer` by default).
    """

    def __init__(self, audit_log: AuditLog, source: Source,
                 patients: PatientLookup | None = None,
                 refusals: Coalescer | None = None) -> None:
        self.log = audit_log
        self.source = source
        self.patients = patients
        self.refusals = refusals if refusals is not None else Coalescer()
        audit_log.on_resume = self._resumed
        audit_log.on_tick = self.flush

    def _write(self, event: Event, refused: bool = False) -> None:
        """Write ``event``, unless it is a refusal (``refused``, and not a success)
        that the coalescing counts instead; the records of ended runs go first."""
        self.flush()
        outcome = event["EventIdentification"].get("EventOutcomeIndicator", SUCCESS)
        if refused and outcome != SUCCESS and not self.refusals.admit(event):
            return
        self.log.write(event)

    def flush(self, everything: bool = False) -> None:
        """Write the record of each run of coalesced refusals whose window ended
        (``everything``: of every run)."""
        for run in self.refusals.ended(everything):
            self.log.write(coalesced_event(run))

    @property
    def enabled(self) -> bool:
        """True when events are written (else the edges skip building them)."""
        return self.log.enabled

    def node(self, address: str = "", requestor: bool = False) -> Participant:
        """This node as a participant (its AE title)."""
        return Participant(self.source.source_id, requestor, address=address)

    def query(self, kind: Code, requestor: Participant, sop_class: str, query: bytes,
              keys: Sequence[str], outcome: int, description: str = "",
              transfer_syntax: str = "", node_address: str = "",
              refused: bool = False, size: int | None = None) -> None:
        """Record a Query (see :func:`query_event`, ``size`` as there); ``refused``: the
        request was refused for who made it (coalesced, see the module docstring)."""
        if self.enabled:
            self._write(query_event(self.source, kind, requestor,
                                    self.node(node_address), sop_class, query, keys,
                                    outcome, description, transfer_syntax, size), refused)

    def transferred(self, kind: Code, action: str, sender: Participant,
                    receiver: Participant, studies: Sequence[Study], outcome: int,
                    description: str = "", others: Sequence[Participant] = (),
                    refused: bool = False) -> None:
        """Record DICOM Instances Transferred, one event per patient (``refused`` as
        for :meth:`query`)."""
        if self.enabled:
            for patient, group in self.per_patient(studies):
                self._write(transferred_event(self.source, kind, action, sender, receiver,
                                              group, patient, outcome, description,
                                              others), refused)

    def received(self, kind: Code, action: str, sender: Participant,
                 receiver: Participant, groups: Mapping[Patient | None, Sequence[Study]],
                 outcome: int, description: str = "", refused: bool = False) -> None:
        """Record DICOM Instances Transferred of instances the node received (C-STORE,
        STOW-RS), one event per patient as the instances named it
        (:func:`studies_by_patient`), not as the index holds it; one event without
        studies when there are none (every store failed).  ``refused`` as for
        :meth:`query`."""
        if not self.enabled:
            return
        for patient, group in (groups or {None: []}).items():
            self._write(transferred_event(self.source, kind, action, sender, receiver,
                                          group, patient, outcome, description), refused)

    def imported(self, kind: Code, importers: Sequence[Participant], media: Participant,
                 groups: Mapping[Patient | None, Sequence[Study]], outcome: int,
                 description: str = "") -> None:
        """Record a Data Import (see :func:`import_event`), one event per patient as the
        instances named it (:func:`studies_by_patient`); one event without studies
        when there are none (every file failed)."""
        if not self.enabled:
            return
        for patient, group in (groups or {None: []}).items():
            self._write(import_event(self.source, kind, importers, media, group, patient,
                                     outcome, description))

    def log_used(self, kind: Code, reader: Participant, log_uri: str,
                 outcome: int = SUCCESS, description: str = "",
                 details: Mapping[str, str] | None = None) -> None:
        """Record an Audit Log Used (see :func:`audit_log_used_event`), the node as the
        application that read it."""
        if self.enabled:
            self._write(audit_log_used_event(self.source, kind, reader, self.node(),
                                             log_uri, outcome, description, details))

    def begin_transferring(self, kind: Code, sender: Participant, receiver: Participant,
                           studies: Sequence[Study], outcome: int = SUCCESS,
                           description: str = "",
                           others: Sequence[Participant] = ()) -> None:
        """Record Begin Transferring DICOM Instances, one event per patient."""
        if self.enabled:
            for patient, group in self.per_patient(studies):
                self._write(begin_transferring_event(self.source, kind, sender, receiver,
                                                     group, patient, outcome,
                                                     description, others))

    def accessed(self, kind: Code, action: str, participants: Sequence[Participant],
                 studies: Sequence[Study], outcome: int, description: str = "",
                 refused: bool = False) -> None:
        """Record DICOM Instances Accessed, one event per patient (``refused`` as
        for :meth:`query`)."""
        if self.enabled:
            for patient, group in self.per_patient(studies):
                self._write(accessed_event(self.source, kind, action, participants,
                                           group, patient, outcome, description), refused)

    def security_alert(self, kind: Code, alert: Code, description: str, outcome: int,
                       others: Sequence[Participant] = ()) -> None:
        """Record a Security Alert (see :func:`security_alert_event`): a minor or
        serious failure is an attempt that was stopped (PS3.15 A.5.3.11), and is
        coalesced with the same ones from the same source."""
        if self.enabled:
            self._write(security_alert_event(self.source, kind, alert,
                                             self.node(requestor=True), description,
                                             outcome, others), refused=True)

    def user_authentication(self, kind: Code, user: Participant, outcome: int,
                            description: str = "") -> None:
        """Record a login (see :func:`user_authentication_event`); a failed one is a
        minor failure (PS3.15 A.5.3.12 leaves the outcome to the node), coalesced with
        the same ones from the same address."""
        if self.enabled:
            self._write(user_authentication_event(self.source, kind, user, self.node(),
                                                  outcome, description), refused=True)

    def deleted(self, kind: Code, participants: Sequence[Participant],
                studies: Sequence[Study], whole: Collection[str],
                patients: Mapping[str, Patient], outcome: int,
                description: str = "") -> None:
        """Record a removal, one event per patient: DICOM Study Deleted for the studies
        in ``whole`` (removed with all their instances), DICOM Instances Accessed with
        action D for the others.

        Parameters
        ----------
        patients :
            The patient of each study, read before its rows were removed
            (:meth:`patients_of`).
        """
        if not self.enabled:
            return
        for patient, group in self.per_patient(studies, patients):
            gone = [study for study in group if study.uid in whole]
            kept = [study for study in group if study.uid not in whole]
            if gone or not kept:
                self._write(study_deleted_event(self.source, kind, participants, gone,
                                                patient, outcome, description))
            if kept:
                self._write(accessed_event(self.source, kind, DELETE, participants, kept,
                                           patient, outcome, description))

    def patients_of(self, study_uids: Sequence[str]) -> Mapping[str, Patient]:
        """The patient of each study the index holds (none when the trail is off or the
        index cannot tell); never raises."""
        if self.patients is None or not study_uids or not self.enabled:
            return {}
        try:
            return self.patients(study_uids)
        except Exception:  # the trail never fails a request: the patient stays unknown
            log.warning("audit trail: the patients of %d stud(ies) could not be read",
                        len(study_uids), exc_info=True)
            return {}

    def per_patient(self, studies: Sequence[Study],
                    known: Mapping[str, Patient] | None = None,
                    ) -> Iterator[tuple[Patient | None, list[Study]]]:
        """The studies grouped by patient (``known``, else read from the index); one
        group, possibly without studies, at least: an event that failed before any
        study was known is still written."""
        if known is None:
            known = self.patients_of([study.uid for study in studies])
        groups: dict[Patient | None, list[Study]] = {}
        for study in studies:
            groups.setdefault(known.get(study.uid), []).append(study)
        if not groups:
            groups[None] = []
        yield from groups.items()

    def _resumed(self, lost: int, since: str) -> Event:
        return security_alert_event(
            self.source, APPLICATION_SERVER, AUDIT_RECORDING_STARTED,
            self.node(requestor=True),
            f"{lost} audit event(s) could not be written since {since}", MINOR_FAILURE)

    def close(self) -> None:
        """Record the refusals still being counted, sync and close the file."""
        if self.enabled:
            self.flush(everything=True)
        self.log.close()


class Counts:
    """Instances stored or imported, counted for the events of one batch (an
    association's C-STOREs, an import): per EventActionCode, study and patient (as each
    instance named it) the instances of each SOP class, per label of what each store did
    its number, and the failures.  Nothing is kept per instance, so what a batch holds
    does not grow with the instances it counts (the same object may be sent again and
    again).  Not thread-safe: its owner locks.

    Parameters
    ----------
    limit : int
        Most studies counted (a study once per action and patient): :meth:`full_for`.
    seconds : float
        Longest a batch counts before its events are due: :meth:`due`.
    """

    def __init__(self, limit: int, seconds: float) -> None:
        self.limit = limit
        self.seconds = seconds
        #: The instances of each SOP class, by (action, study, patient), in the order
        #: first seen; keys kept as the first store gave them.
        self.studies: dict[tuple[str, str, Patient | None], dict[str, int]] = {}
        #: Instances counted by the label of what their store did.
        self.done: dict[str, int] = {}
        self.failed = 0
        self._since: float | None = None  # when counting began

    @property
    def stored(self) -> int:
        """The instances counted (failures aside)."""
        return sum(self.done.values())

    def full_for(self, action: str, study_uid: str, patient: Patient | None) -> bool:
        """True when an instance of this study would pass the limit: the counts so far
        are to be written first (:meth:`take`)."""
        return ((action, study_uid, patient) not in self.studies
                and len(self.studies) >= self.limit)

    def add(self, action: str, study_uid: str, sop_class_uid: str,
            patient: Patient | None, done: str) -> None:
        """Count one instance stored; ``done``, the label of what its store did."""
        classes = self.studies.setdefault((action, study_uid, patient), {})
        if sop_class_uid:
            classes[sop_class_uid] = classes.get(sop_class_uid, 0) + 1
        self.done[done] = self.done.get(done, 0) + 1
        self._started()

    def fail(self, count: int = 1) -> None:
        """Count ``count`` failures."""
        self.failed += count
        self._started()

    def _started(self) -> None:
        if self._since is None:
            self._since = time.monotonic()

    def due(self) -> bool:
        """True once the counting began :attr:`seconds` ago."""
        return self._since is not None and time.monotonic() - self._since >= self.seconds

    def take(self) -> Counts:
        """What is counted so far; this batch counts again from nothing."""
        taken = copy.copy(self)  # the counts move to it
        self.studies, self.done, self.failed, self._since = {}, {}, 0, None
        return taken

    def by_action(self) -> dict[str, dict[Patient | None, list[Study]]]:
        """The studies counted, per action and patient."""
        groups: dict[str, dict[Patient | None, list[Study]]] = {}
        for (action, study_uid, patient), classes in self.studies.items():
            groups.setdefault(action, {}).setdefault(patient, []).append(
                Study(study_uid, classes))
        return groups

    def outcome(self) -> int:
        """The batch's outcome as a whole (:func:`batch_outcome`)."""
        return batch_outcome(self.stored, self.failed)


#: Most studies (a study counted once per patient its instances named) one import
#: counts before their events are written: what an import holds for the trail stays
#: bounded however many files it reads, as an association's C-STOREs
#: (:data:`pacs.dimse.audit.MAX_STUDIES_PER_EVENT`).
MAX_STUDIES_PER_IMPORT = 1000
#: Seconds of an import one event counts at most: a long import (a whole archive
#: dropped into the upload folder, one scan) killed midway loses the record of that
#: many seconds at most, as an association's C-STOREs
#: (:data:`pacs.dimse.audit.STORES_PER_EVENT_SECONDS`).
SECONDS_PER_IMPORT_EVENT = 10.0


class ImportAudit:
    """The Data Import events (PS3.15 A.5.3.5) of one import: a ``pacs import`` run, or
    one scan of the upload folder.

    What was stored is counted per study, patient (as each instance named it,
    :attr:`pacs.core.ingest.StoreResult.patient`) and SOP class, and the failures are
    counted: nothing is kept per instance or per file (no file name is ever written:
    it may carry a patient's name).  The events, one per patient, are written when
    :data:`MAX_STUDIES_PER_IMPORT` studies are counted, after
    :data:`SECONDS_PER_IMPORT_EVENT` of counting and at :meth:`write`, with the
    outcome of the C-STORE events (0 when every file was stored, 4 when some failed, 8
    when all did).  Nothing is counted while the trail is off.  Not thread-safe: one
    importing thread.

    Parameters
    ----------
    trail : AuditTrail
        Where the events go.
    importers : sequence of Participant
        Who imports (Destination Role ID): the requestor (the operator, or the node's
        watcher) first.
    media : Participant
        The Source Media (:func:`source_media`).
    what : str
        What imports, at the head of each event's EventOutcomeDescription.
    limit : int
        :data:`MAX_STUDIES_PER_IMPORT`.
    """

    def __init__(self, trail: AuditTrail, importers: Sequence[Participant],
                 media: Participant, what: str, limit: int = MAX_STUDIES_PER_IMPORT) -> None:
        self.trail = trail
        self.importers = list(importers)
        self.media = media
        self.what = what
        self._counts = Counts(limit, SECONDS_PER_IMPORT_EVENT)

    def stored(self, study_uid: str, sop_class_uid: str, patient: Patient | None,
               done: str = "stored") -> None:
        """One instance stored; ``done``: what its store did (``stored``, ``replaced``,
        ``unchanged``: :class:`pacs.core.ingest.Outcome`), counted for the description."""
        if not self.trail.enabled:
            return
        if self._counts.full_for(CREATE, study_uid, patient):
            self.write()
        self._counts.add(CREATE, study_uid, sop_class_uid, patient, done)
        if self._counts.due():
            self.write()

    def failed(self, count: int = 1) -> None:
        """``count`` files not stored (refused, unreadable)."""
        if self.trail.enabled and count:
            self._counts.fail(count)
            if self._counts.due():
                self.write()

    def write(self) -> None:
        """Write the events of what is counted (none when nothing is), and count again
        from nothing."""
        counts = self._counts.take()
        if not counts.stored and not counts.failed:
            return
        done = ", ".join(f"{count} {word}" for word, count in counts.done.items())
        description = (f"{self.what}: {counts.stored} instance(s) imported"
                       + (f" ({done})" if done else "") + f", {counts.failed} failed")
        self.trail.imported(APPLICATION_SERVER, self.importers, self.media,
                            counts.by_action().get(CREATE, {}), counts.outcome(),
                            description)


def patients_in_index(connection: Callable[[], Any], study_uids: Sequence[str]
                      ) -> dict[str, Patient]:
    """The Patient ID (and issuer) the index holds for each of ``study_uids``, as sent
    in that study (PS3.4 C.3.2); studies it does not hold are left out.

    Parameters
    ----------
    connection : callable
        This thread's index connection (:meth:`pacs.core.index.connection.Index.connection`).
    """
    unique = list(dict.fromkeys(study_uids))
    found: dict[str, Patient] = {}
    for start in range(0, len(unique), reads.MAX_KEYS):  # a statement's bound
        found.update((uid, Patient(patient_id, issuer)) for uid, (patient_id, issuer)
                     in reads.study_patients(connection(),
                                             unique[start:start + reads.MAX_KEYS]).items())
    return found


# --- reading the trail, DICOM XML, syslog ----------------------------------------------

def read_events(lines: Iterable[bytes]) -> Iterator[Event | None]:
    """The events of the trail's lines, ``None`` for a line that is not one (a line
    cut short by a full disk); blank lines are skipped."""
    for line in lines:
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            yield None
            continue
        yield event if isinstance(event, dict) else None


#: Elements of the DICOM audit message schema (PS3.15 A.5.1) written as XML attributes.
_ATTRIBUTES = {
    "EventIdentification": ("EventActionCode", "EventDateTime", "EventOutcomeIndicator"),
    "ActiveParticipant": ("UserID", "AlternativeUserID", "UserName", "UserIsRequestor",
                          "NetworkAccessPointID", "NetworkAccessPointTypeCode"),
    "AuditSourceIdentification": ("AuditEnterpriseSiteID", "AuditSourceID"),
    "ParticipantObjectIdentification": (
        "ParticipantObjectID", "ParticipantObjectTypeCode",
        "ParticipantObjectTypeCodeRole", "ParticipantObjectDataLifeCycle",
        "ParticipantObjectSensitivity"),
}
#: The order of the children of each element (the schema is a sequence).
_CHILDREN = {
    "EventIdentification": ("EventID", "EventTypeCode", "EventOutcomeDescription"),
    "ActiveParticipant": ("RoleIDCode", "MediaIdentifier"),
    "AuditSourceIdentification": ("AuditSourceTypeCode",),
    "ParticipantObjectIdentification": (
        "ParticipantObjectIDTypeCode", "ParticipantObjectName", "ParticipantObjectQuery",
        "ParticipantObjectDetail", "ParticipantObjectDescription"),
}


#: Control characters (C0, DEL, C1, Unicode's line and paragraph separators) written as
#: escapes: a value a peer chose (a user name, a Patient ID) never starts a line of its
#: own in what a person reads, nor puts a character XML 1.0 forbids into a message.
_CONTROLS = ({code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
             | {0x2028: "\\u2028", 0x2029: "\\u2029"})
#: The summary's escapes: the controls, and the backslash, so that an escape is never
#: taken for a value's own text.
_SUMMARY_ESCAPES = {**_CONTROLS, ord("\\"): "\\\\"}
#: :data:`_SUMMARY_ESCAPES` and the separators of the summary's fields (``who=A@host*,
#: B@host studies=1.2,1.3``), for the values a peer chose.
_FIELD_ESCAPES = {**_SUMMARY_ESCAPES, **{ord(c): f"\\x{ord(c):02x}" for c in "@*, ="}}


def _escaped(value: Any, escapes: Mapping[int, str] = _CONTROLS) -> str:
    return str(value).translate(escapes)


def _xml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return _escaped(value)


def _coded(parent: ET.Element, name: str, code: Mapping[str, str]) -> None:
    ET.SubElement(parent, name, {key: code[key] for key in
                                 ("csd-code", "codeSystemName", "originalText") if key in code})


def _element(parent: ET.Element, name: str, item: Mapping[str, Any]) -> None:
    element = ET.SubElement(parent, name, {key: _xml_value(item[key])
                                           for key in _ATTRIBUTES[name] if key in item})
    for child in _CHILDREN[name]:
        value = item.get(child)
        if value is None:
            continue
        if child == "ParticipantObjectDetail":
            for detail in value:  # the schema's value is base64Binary
                ET.SubElement(element, child, {"type": detail["type"], "value":
                                               base64.b64encode(str(detail["value"])
                                                                .encode()).decode("ascii")})
        elif child == "MediaIdentifier":  # the schema's MediaIdentifier holds MediaType
            _coded(ET.SubElement(element, child), "MediaType", value["MediaType"])
        elif child == "ParticipantObjectDescription":
            description = ET.SubElement(element, child)
            for sop_class in value.get("SOPClass", ()):
                ET.SubElement(description, "SOPClass", {
                    "UID": sop_class["UID"],
                    "NumberOfInstances": str(sop_class["NumberOfInstances"])})
        elif isinstance(value, list):
            for code in value:
                _coded(element, child, code)
        elif isinstance(value, dict):
            _coded(element, child, value)
        else:
            ET.SubElement(element, child).text = _escaped(value)


def to_xml(event: Mapping[str, Any]) -> str:
    """An event as a DICOM audit message (PS3.15 A.5.1, the RFC 3881 schema as DICOM
    specializes it), for an ATNA audit record repository."""
    root = ET.Element("AuditMessage")
    _element(root, "EventIdentification", event["EventIdentification"])
    for participant in event.get("ActiveParticipant", ()):
        _element(root, "ActiveParticipant", participant)
    _element(root, "AuditSourceIdentification", event["AuditSourceIdentification"])
    for item in event.get("ParticipantObjectIdentification", ()):
        _element(root, "ParticipantObjectIdentification", item)
    return ET.tostring(root, encoding="unicode")


#: RFC 5424 PRI of audit messages: facility 10 (security/authorization), severity 5
#: (notice) for success, 4 (warning) for a failure (IHE ITI TF-2 3.20.4.2, RFC 5424 6.2.1).
def _pri(outcome: int) -> int:
    return 10 * 8 + (5 if outcome == SUCCESS else 4)


def syslog_message(event: Mapping[str, Any], hostname: str, app_name: str = "pacs",
                   procid: str = "-") -> bytes:
    """An event as one RFC 5424 syslog message with the DICOM XML as its body, MSGID
    ``IHE+RFC-3881`` (IHE ITI TF-2 3.20.4.2, ATNA's syslog transport)."""
    identification = event["EventIdentification"]
    header = (f"<{_pri(int(identification['EventOutcomeIndicator']))}>1 "
              f"{identification['EventDateTime']} {hostname or '-'} {app_name} {procid} "
              f"IHE+RFC-3881 - ")
    return header.encode("utf-8") + b"\xef\xbb\xbf" + to_xml(event).encode("utf-8")


def frame_octets(message: bytes) -> bytes:
    """RFC 5425 / RFC 6587 octet-counting frame of one message on a stream."""
    return str(len(message)).encode("ascii") + b" " + message


def matches(event: Mapping[str, Any], *, site: str | None = None, study: str = "",
            patient: str = "", user: str = "") -> bool:
    """True when ``event`` was written for ``site`` (its AuditEnterpriseSiteID: the
    customer) and names ``study`` (a Study Instance UID), ``patient`` (a Patient ID)
    and ``user`` (a participant's UserID), each when given.

    Customers may share one trail (``PACS_AUDIT_LOG`` naming one file for all): the
    site keeps one customer's reader from seeing, or shipping, another's events.
    """
    source = event.get("AuditSourceIdentification")
    if site is not None and (not isinstance(source, Mapping)
                             or source.get("AuditEnterpriseSiteID") != site):
        return False
    objects = event.get("ParticipantObjectIdentification", ())
    if study and not any(item.get("ParticipantObjectIDTypeCode", {}).get("csd-code")
                         == STUDY_INSTANCE_UID.code and item.get("ParticipantObjectID")
                         == study for item in objects):
        return False
    if patient and not any(
            item.get("ParticipantObjectTypeCodeRole") == PATIENT_ROLE
            and str(item.get("ParticipantObjectID", "")).split("^", 1)[0] == patient
            for item in objects):
        return False
    return not user or any(p.get("UserID") == user for p in event.get("ActiveParticipant", ()))


def summary(event: Mapping[str, Any]) -> str:
    """One line for a person: when, what, outcome, who, studies, patients (control
    characters and backslashes of the values escaped, so that no value starts a line;
    in the values of participants, studies and patients the line's own separators too,
    so that a name a peer chose cannot read as another participant or field)."""
    identification = event.get("EventIdentification", {})
    who = ", ".join(_field(p.get("UserID", "")) + "@" + _field(p.get("NetworkAccessPointID", ""))
                    + ("*" if p.get("UserIsRequestor") else "")
                    for p in event.get("ActiveParticipant", ()))
    studies, patients = [], []
    for item in event.get("ParticipantObjectIdentification", ()):
        code = item.get("ParticipantObjectIDTypeCode", {}).get("csd-code")
        if code == STUDY_INSTANCE_UID.code:
            studies.append(_field(item.get("ParticipantObjectID", "")))
        elif item.get("ParticipantObjectTypeCodeRole") == PATIENT_ROLE:
            patients.append(_field(item.get("ParticipantObjectID", "")))
    head = (f"{identification.get('EventDateTime', '')} "
            f"{identification.get('EventID', {}).get('originalText', '')} "
            f"[{identification.get('EventActionCode', '')}] "
            f"outcome={identification.get('EventOutcomeIndicator', '')}")
    return (f"{_escaped(head, _SUMMARY_ESCAPES)} who={who} "
            f"studies={','.join(studies) or '-'} patients={','.join(patients) or '-'}")


def _field(value: Any) -> str:
    """A value of :func:`summary`'s line, escaped."""
    return _escaped(value, _FIELD_ESCAPES)


def ship(events: Iterable[Mapping[str, Any]], host: str, port: int, *, udp: bool = False,
         hostname: str | None = None, timeout: float = 30.0,
         tls: ssl.SSLContext | None = None) -> int:
    """Send events to an audit record repository as RFC 5424 syslog messages carrying
    the DICOM XML (IHE ATNA): over TLS with ``tls`` (RFC 5425: octet-counting frames,
    the repository's certificate verified for ``host``), over plain TCP with the same
    frames (RFC 6587 3.4.1), or one UDP datagram each (RFC 5426).

    Returns
    -------
    int
        The number of messages sent.

    Raises
    ------
    OSError
        The repository cannot be reached, or the connection broke.
    """
    name = hostname or socket.gethostname()
    procid = str(os.getpid())
    sent = 0
    if udp:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                           socket.SOCK_DGRAM) as sock:
            for event in events:
                sock.sendto(syslog_message(event, name, procid=procid), (host, port))
                sent += 1
        return sent
    with socket.create_connection((host, port), timeout=timeout) as plain:
        sock = plain if tls is None else tls.wrap_socket(plain, server_hostname=host)
        with sock:
            for event in events:
                sock.sendall(frame_octets(syslog_message(event, name, procid=procid)))
                sent += 1
    return sent


def parse_since(text: str) -> str:
    """An EventDateTime lower bound from ``2024-05-01`` or ``2024-05-01T12:00`` (UTC),
    comparable with the trail's as text.

    Raises
    ------
    ValueError
        Not an ISO 8601 date or date and time.
    """
    moment = datetime.datetime.fromisoformat(text.rstrip("Z"))
    if moment.tzinfo is not None:
        moment = moment.astimezone(datetime.UTC).replace(tzinfo=None)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
