"""The structure of the audit messages of PS3.15 A.5, checked field by field.

Written from the standard's tables (A.5.1 schema, A.5.3.2, A.5.3.3, A.5.3.5, A.5.3.6,
A.5.3.7, A.5.3.8, A.5.3.10, A.5.3.11, A.5.3.12), independently of
:mod:`pacs.core.audit`, so that the tests of the trail compare its events with the
standard and not with themselves.
:func:`problems` returns what is wrong with one event (empty: it conforms);
:func:`read_trail` reads a trail file.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TOP_LEVEL = {"EventIdentification", "ActiveParticipant", "AuditSourceIdentification",
             "ParticipantObjectIdentification"}
IDENTIFICATION = {"EventID", "EventActionCode", "EventDateTime", "EventOutcomeIndicator",
                  "EventTypeCode", "EventOutcomeDescription"}
PARTICIPANT = {"UserID", "AlternativeUserID", "UserName", "UserIsRequestor", "RoleIDCode",
               "MediaIdentifier", "NetworkAccessPointTypeCode", "NetworkAccessPointID"}
SOURCE = {"AuditSourceID", "AuditEnterpriseSiteID", "AuditSourceTypeCode"}
OBJECT = {"ParticipantObjectID", "ParticipantObjectTypeCode", "ParticipantObjectTypeCodeRole",
          "ParticipantObjectDataLifeCycle", "ParticipantObjectSensitivity",
          "ParticipantObjectIDTypeCode", "ParticipantObjectName", "ParticipantObjectQuery",
          "ParticipantObjectDetail", "ParticipantObjectDescription"}
CODE = {"csd-code", "codeSystemName", "originalText"}

#: EventID code → (A.5 section, allowed EventActionCodes).
MESSAGES = {
    "110112": ("A.5.3.10 Query", {"E"}),
    "110104": ("A.5.3.7 DICOM Instances Transferred", {"C", "R", "U"}),
    "110102": ("A.5.3.3 Begin Transferring DICOM Instances", {"E"}),
    "110103": ("A.5.3.6 DICOM Instances Accessed", {"C", "R", "U", "D"}),
    "110105": ("A.5.3.8 DICOM Study Deleted", {"D"}),
    "110113": ("A.5.3.11 Security Alert", {"C", "R", "U", "D", "E"}),
    "110114": ("A.5.3.12 User Authentication", {"E"}),
    "110107": ("A.5.3.5 Data Import", {"C"}),
    "110101": ("A.5.3.2 Audit Log Used", {"R"}),
}
#: EventIDs whose participant objects are studies and at most one patient.
STUDY_MESSAGES = {"110104", "110102", "110103", "110105", "110107"}
SOURCE_ROLE, DESTINATION_ROLE, SOURCE_MEDIA = "110153", "110152", "110155"
#: PS3.16 CID 405 Media Type.
MEDIA_TYPES = {"110010", "110030", "110031", "110032", "110033", "110034", "110035",
               "110036", "110037", "110038"}
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def _code_problems(where: str, value: Any) -> list[str]:
    if not isinstance(value, dict) or not {"csd-code", "codeSystemName"} <= set(value) \
            or set(value) - CODE:
        return [f"{where}: not a coded value: {value!r}"]
    return []


def _role(participant: Mapping[str, Any]) -> str | None:
    role = participant.get("RoleIDCode")
    return role.get("csd-code") if isinstance(role, dict) else None


def _identification_problems(identification: Any) -> list[str]:
    if not isinstance(identification, dict):
        return ["EventIdentification missing"]
    found = [f"EventIdentification.{key}: unknown field"
             for key in set(identification) - IDENTIFICATION]
    for key in ("EventID", "EventActionCode", "EventDateTime", "EventOutcomeIndicator"):
        if key not in identification:
            found.append(f"EventIdentification.{key} missing (M)")
    found += _code_problems("EventID", identification.get("EventID"))
    if identification.get("EventOutcomeIndicator") not in (0, 4, 8, 12):
        found.append("EventOutcomeIndicator not 0, 4, 8 or 12 (A.5.3)")
    when = str(identification.get("EventDateTime", ""))
    if not when.endswith("Z"):
        found.append(f"EventDateTime not UTC: {when}")
    else:
        try:
            datetime.datetime.fromisoformat(when[:-1] + "+00:00")
        except ValueError:
            found.append(f"EventDateTime not ISO 8601: {when}")
    for code in identification.get("EventTypeCode", []):
        found += _code_problems("EventTypeCode", code)
    return found


def _participant_problems(participants: Any) -> list[str]:
    if not isinstance(participants, list) or not participants:
        return ["ActiveParticipant missing"]
    found = []
    for number, participant in enumerate(participants):
        where = f"ActiveParticipant[{number}]"
        found += [f"{where}.{key}: unknown field" for key in set(participant) - PARTICIPANT]
        if not isinstance(participant.get("UserID"), str) or not participant["UserID"]:
            found.append(f"{where}.UserID missing (M)")
        if not isinstance(participant.get("UserIsRequestor"), bool):
            found.append(f"{where}.UserIsRequestor missing (M)")
        if "RoleIDCode" in participant:
            found += _code_problems(f"{where}.RoleIDCode", participant["RoleIDCode"])
        if "MediaIdentifier" in participant:
            media = participant["MediaIdentifier"]
            found += _code_problems(f"{where}.MediaIdentifier.MediaType",
                                    media.get("MediaType") if isinstance(media, dict)
                                    else None)
        if "NetworkAccessPointID" in participant and \
                participant.get("NetworkAccessPointTypeCode") not in (1, 2, 5):
            found.append(f"{where}.NetworkAccessPointTypeCode missing or wrong")
    if not any(p.get("UserIsRequestor") for p in participants):
        found.append("no ActiveParticipant is the requestor")
    return found


def _study_problems(item: Mapping[str, Any]) -> list[str]:
    found = []
    if item.get("ParticipantObjectTypeCode") != 2 or item.get(
            "ParticipantObjectTypeCodeRole") != 3:
        found.append("study: ParticipantObjectTypeCode 2 / Role 3 expected")
    if not UID.match(str(item.get("ParticipantObjectID", ""))):
        found.append(f"study: ParticipantObjectID not a UID: {item.get('ParticipantObjectID')}")
    for sop_class in item.get("ParticipantObjectDescription", {}).get("SOPClass", []):
        if not UID.match(sop_class.get("UID", "")) or \
                not isinstance(sop_class.get("NumberOfInstances"), int):
            found.append(f"study: bad SOPClass {sop_class!r}")
    return found


def _patient_problems(item: Mapping[str, Any]) -> list[str]:
    found = []
    if item.get("ParticipantObjectTypeCode") != 1 or item.get(
            "ParticipantObjectTypeCodeRole") != 1:
        found.append("patient: ParticipantObjectTypeCode 1 / Role 1 expected")
    if item.get("ParticipantObjectIDTypeCode", {}).get("codeSystemName") != "RFC-3881" or \
            item["ParticipantObjectIDTypeCode"].get("csd-code") != "2":
        found.append("patient: ParticipantObjectIDTypeCode (2, RFC-3881) expected")
    return found


def _object_problems(objects: list[dict[str, Any]]) -> list[str]:
    found = []
    for number, item in enumerate(objects):
        where = f"ParticipantObjectIdentification[{number}]"
        found += [f"{where}.{key}: unknown field" for key in set(item) - OBJECT]
        for key in ("ParticipantObjectID", "ParticipantObjectIDTypeCode"):
            if key not in item:
                found.append(f"{where}.{key} missing (M)")
        found += _code_problems(f"{where}.ParticipantObjectIDTypeCode",
                                item.get("ParticipantObjectIDTypeCode"))
    return found


def problems(event: Mapping[str, Any]) -> list[str]:
    """What in ``event`` breaks PS3.15 A.5 (empty when nothing does)."""
    found = [f"unknown top-level field {key}" for key in set(event) - TOP_LEVEL]
    identification = event.get("EventIdentification")
    found += _identification_problems(identification)
    if found:
        return found
    event_id = identification["EventID"]["csd-code"]
    if event_id not in MESSAGES:
        return [f"EventID {event_id} is not one the node writes"]
    section, actions = MESSAGES[event_id]
    if identification["EventActionCode"] not in actions:
        found.append(f"{section}: EventActionCode {identification['EventActionCode']}")
    participants = event.get("ActiveParticipant")
    found += _participant_problems(participants)
    source = event.get("AuditSourceIdentification", {})
    found += [f"AuditSourceIdentification.{key}: unknown field" for key in set(source) - SOURCE]
    if not source.get("AuditSourceID"):
        found.append("AuditSourceIdentification.AuditSourceID missing (M)")
    objects = event.get("ParticipantObjectIdentification", [])
    found += _object_problems(objects)
    if found:
        return found
    roles = [_role(p) for p in participants]
    if event_id in ("110112", "110104", "110102") and (
            roles.count(SOURCE_ROLE) != 1 or roles.count(DESTINATION_ROLE) != 1):
        found.append(f"{section}: one Source and one Destination participant expected")
    if event_id == "110112":
        queried = [o for o in objects
                   if o["ParticipantObjectIDTypeCode"].get("csd-code") == "110181"]
        if len(queried) != 1 or len(objects) != 1:
            found.append(f"{section}: exactly one SOP Queried object expected")
        else:
            found += _query_problems(queried[0])
    elif event_id in STUDY_MESSAGES:
        if event_id == "110107":
            found += _import_problems(section, participants)
        if event_id in ("110103", "110105") and not 1 <= len(participants) <= 2:
            found.append(f"{section}: one or two participants expected")
        patients = [o for o in objects if o.get("ParticipantObjectTypeCodeRole") == 1]
        studies = [o for o in objects
                   if o["ParticipantObjectIDTypeCode"].get("csd-code") == "110180"]
        if len(patients) > 1:
            found.append(f"{section}: one patient at most (the message names one)")
        if len(patients) + len(studies) != len(objects):
            found.append(f"{section}: objects other than studies and the patient")
        if event_id == "110105" and not studies:
            found.append(f"{section}: the deleted studies expected (1..n)")
        for study in studies:
            found += _study_problems(study)
        for patient in patients:
            found += _patient_problems(patient)
    elif event_id == "110113" and not identification.get("EventTypeCode"):
        found.append(f"{section}: EventTypeCode (CID 403) expected")
    elif event_id == "110114":
        found += _login_problems(section, identification, participants, objects)
    elif event_id == "110101":
        found += _log_used_problems(section, objects)
    return found


def _import_problems(section: str, participants: list[Mapping[str, Any]]) -> list[str]:
    """A.5.3.5: one Source Media (110155, with its MediaType of CID 405 (M)); the
    importing users or processes Destination (110152), remote sources Source (110153)."""
    found = []
    media = [p for p in participants if _role(p) == SOURCE_MEDIA]
    if len(media) != 1:
        found.append(f"{section}: one Source Media participant expected")
    elif media[0].get("MediaIdentifier", {}).get("MediaType", {}).get("csd-code") \
            not in MEDIA_TYPES:
        found.append(f"{section}: the Source Media's MediaType (CID 405) expected (M)")
    if any(_role(p) not in (SOURCE_MEDIA, DESTINATION_ROLE, SOURCE_ROLE)
           for p in participants):
        found.append(f"{section}: participants other than importers, media and sources")
    return found


def _log_used_problems(section: str, objects: list[Mapping[str, Any]]) -> list[str]:
    """A.5.3.2: exactly one object, the audit log: type 2 (system), role 13 (Security
    Resource), ID type 12 (URI), ParticipantObjectName "Security Audit Log" (M)."""
    if len(objects) != 1:
        return [f"{section}: exactly one participant object, the audit log, expected"]
    log = objects[0]
    found = []
    if log.get("ParticipantObjectTypeCode") != 2 or \
            log.get("ParticipantObjectTypeCodeRole") != 13:
        found.append(f"{section}: ParticipantObjectTypeCode 2 / Role 13 expected")
    if log["ParticipantObjectIDTypeCode"].get("csd-code") != "12" or \
            log["ParticipantObjectIDTypeCode"].get("codeSystemName") != "RFC-3881":
        found.append(f"{section}: ParticipantObjectIDTypeCode (12, RFC-3881) expected")
    if log.get("ParticipantObjectName") != "Security Audit Log":
        found.append(f"{section}: ParticipantObjectName \"Security Audit Log\" expected")
    if not str(log.get("ParticipantObjectID", "")).startswith("file:"):
        found.append(f"{section}: ParticipantObjectID: the log's URI expected")
    return found


def _login_problems(section: str, identification: Mapping[str, Any],
                    participants: list[Mapping[str, Any]],
                    objects: list[Mapping[str, Any]]) -> list[str]:
    """A.5.3.12: EventTypeCode Login or Logout (M); the person authenticated or claimed
    with its network access point (M), and at most one authenticating node; no objects."""
    found = []
    codes = [code.get("csd-code") for code in identification.get("EventTypeCode", [])]
    if codes not in (["110122"], ["110123"]):
        found.append(f"{section}: EventTypeCode Login (110122) or Logout (110123) expected")
    if not 1 <= len(participants) <= 2:
        found.append(f"{section}: the user and at most the node expected")
    elif not participants[0].get("NetworkAccessPointID") or \
            not participants[0].get("NetworkAccessPointTypeCode"):
        found.append(f"{section}: the user's NetworkAccessPointID and TypeCode (M)")
    if objects:
        found.append(f"{section}: no participant objects expected")
    return found


def _query_problems(queried: Mapping[str, Any]) -> list[str]:
    found = []
    if queried.get("ParticipantObjectTypeCode") != 2 or \
            queried.get("ParticipantObjectTypeCodeRole") != 3:
        found.append("SOP Queried: ParticipantObjectTypeCode 2 / Role 3 expected")
    if not UID.match(str(queried.get("ParticipantObjectID", ""))):
        found.append("SOP Queried: ParticipantObjectID is not a SOP Class UID")
    try:
        base64.b64decode(queried.get("ParticipantObjectQuery", ""), validate=True)
    except (binascii.Error, ValueError):
        found.append("SOP Queried: ParticipantObjectQuery not base64 (M)")
    if "ParticipantObjectQuery" not in queried:
        found.append("SOP Queried: ParticipantObjectQuery missing (M)")
    return found


def read_trail(path: Path) -> list[dict[str, Any]]:
    """Every event of a trail file; fails on a line that is not one JSON object.

    No file is no event yet: the node creates the trail with its first event, which a
    DIMSE worker writes when the association has ended, after the peer has its answer.
    """
    if not path.exists():
        return []
    events = []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        event = json.loads(line)
        assert isinstance(event, dict), f"line {number} is not an object"
        events.append(event)
    return events


def event_name(event: Mapping[str, Any]) -> str:
    """The EventID's text ("Query", "DICOM Instances Transferred", …)."""
    return str(event["EventIdentification"]["EventID"]["originalText"])


def studies_in(event: Mapping[str, Any]) -> list[str]:
    """The Study Instance UIDs an event names."""
    return [o["ParticipantObjectID"] for o in event.get("ParticipantObjectIdentification", [])
            if o["ParticipantObjectIDTypeCode"].get("csd-code") == "110180"]


def patients_in(event: Mapping[str, Any]) -> list[str]:
    """The Patient IDs an event names."""
    return [o["ParticipantObjectID"] for o in event.get("ParticipantObjectIdentification", [])
            if o.get("ParticipantObjectTypeCodeRole") == 1]


def requestor(event: Mapping[str, Any]) -> Mapping[str, Any]:
    """The participant that asked for the event."""
    return next(p for p in event["ActiveParticipant"] if p["UserIsRequestor"])


def query_of(event: Mapping[str, Any]) -> bytes:
    """The ParticipantObjectQuery of a Query event, decoded."""
    return base64.b64decode(event["ParticipantObjectIdentification"][0]
                            ["ParticipantObjectQuery"])


def detail(event: Mapping[str, Any], kind: str) -> str | None:
    """A ParticipantObjectDetail value of the first object, by type."""
    for item in event["ParticipantObjectIdentification"][0].get("ParticipantObjectDetail", []):
        if item["type"] == kind:
            return str(item["value"])
    return None
