"""C-MOVE and C-GET with dcmtk against ``pacs serve`` (PS3.4 C.4.2, C.4.3).

``movescu`` moves to a dcmtk ``storescp`` started here (bit-preserving, so its files hold
the data sets exactly as they came over the network), and ``getscu`` retrieves over its
own association, at the STUDY, SERIES and IMAGE levels of both information models (and
PATIENT in Patient Root).  Every received data set must equal the stored object's data
set byte for byte when no conversion was needed; compressed objects that getscu did not
negotiate arrive decompressed with the pixel data pydicom decodes from the originals.
"""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from tests.conftest import sample
from tests.factory import dataset_bytes, uid_list_of_length
from tests.interop.conftest import (
    AE_TITLE,
    Node,
    dcmtk,
    getscu_counts,
    run_dcmtk,
    start_storescp,
)

pytestmark = [pytest.mark.interop, pytest.mark.dimse]

STORESCP_AET = "STORESCP"
#: Compressed test files (each its own SOP Instance), stored as sent.
COMPRESSED = ("SC_rgb_jpeg_dcmtk.dcm", "JPEG-LL.dcm", "MR_small_jp2klossless.dcm",
              "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm")


@dataclass
class Loaded:
    """What the node holds: one CT study of two series, another patient's study,
    and a study of compressed objects."""

    patient_id: str
    study: str
    series: dict[str, list[str]]
    other_study: str
    compressed_study: str
    compressed: dict[str, pydicom.Dataset] = field(repr=False)

    @property
    def sops(self) -> list[str]:
        return [sop for sops in self.series.values() for sop in sops]

    def series_uid(self, n: int) -> str:
        return list(self.series)[n]


@dataclass
class StoreSCP:
    """dcmtk's storescp (bit-preserving) writing into ``folder``."""

    port: int
    folder: Path
    process: subprocess.Popen[bytes]

    def clear(self) -> None:
        for path in self.folder.iterdir():
            path.unlink()


def _save(ds: pydicom.Dataset, path: Path) -> None:
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)


def _write_inputs(folder: Path) -> Loaded:
    """CT_small under new UIDs (2 series x 3), a second patient, the compressed files."""
    folder.mkdir(parents=True)
    ct = pydicom.dcmread(sample("CT_small.dcm"))
    loaded = Loaded(patient_id="QR-DCMTK", study=generate_uid(), series={},
                    other_study=generate_uid(), compressed_study=generate_uid(),
                    compressed={})
    ct.PatientID = loaded.patient_id
    ct.StudyInstanceUID = loaded.study
    for s in range(2):
        ct.SeriesInstanceUID = generate_uid()
        loaded.series[ct.SeriesInstanceUID] = []
        for i in range(3):
            ct.SOPInstanceUID = generate_uid()
            ct.InstanceNumber = i + 1
            _save(ct, folder / f"ct{s}{i}.dcm")
            loaded.series[ct.SeriesInstanceUID].append(ct.SOPInstanceUID)
    ct.PatientID = "QR-OTHER"
    ct.StudyInstanceUID = loaded.other_study
    ct.SeriesInstanceUID = generate_uid()
    for i in range(2):
        ct.SOPInstanceUID = generate_uid()
        _save(ct, folder / f"other{i}.dcm")
    for n, name in enumerate(COMPRESSED):
        ds = pydicom.dcmread(sample(name))
        ds.PatientID = "QR-COMPRESSED"
        ds.StudyInstanceUID = loaded.compressed_study
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        _save(ds, folder / f"compressed{n}.dcm")
        loaded.compressed[ds.SOPInstanceUID] = pydicom.dcmread(folder / f"compressed{n}.dcm")
    return loaded


#: The storescp destinations: AE title -> options for the transfer syntaxes it accepts.
#: STORESCP takes everything it knows; UNCOMPR only the uncompressed syntaxes (dcmtk's
#: default); IMPLICIT only Implicit VR Little Endian.
DESTINATIONS = {STORESCP_AET: ["+xa"], "UNCOMPR": [], "IMPLICIT": ["+xi"]}


@pytest.fixture(scope="module")
def storescps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, StoreSCP]]:
    """The storescp destinations (bit-preserving: data sets written as read)."""
    started: dict[str, StoreSCP] = {}
    try:
        for aet, options in DESTINATIONS.items():
            folder = tmp_path_factory.mktemp(aet.lower())
            port, process = start_storescp(aet, folder, *options, "+B",
                                           log=folder.parent / f"{folder.name}.log")
            started[aet] = StoreSCP(port, folder, process)
        yield started
    finally:
        for scp in started.values():
            scp.process.terminate()
            try:
                scp.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                scp.process.kill()
                scp.process.wait()


@pytest.fixture
def storescp(storescps: dict[str, StoreSCP]) -> StoreSCP:
    """The accept-all storescp, emptied."""
    scp = storescps[STORESCP_AET]
    scp.clear()
    return scp


@pytest.fixture(scope="module")
def qr(node_factory: Callable[..., Node], storescps: dict[str, StoreSCP],
       tmp_path_factory: pytest.TempPathFactory) -> tuple[Node, Loaded]:
    """A node that knows the storescps as C-MOVE destinations, loaded with dcmsend."""
    for tool in ("movescu", "getscu", "dcmsend"):
        dcmtk(tool)
    modalities = ",".join(f"{aet}=127.0.0.1:{scp.port}" for aet, scp in storescps.items())
    node = node_factory("qr", PACS_MODALITIES=modalities)
    inputs = tmp_path_factory.mktemp("qr-inputs") / "files"
    loaded = _write_inputs(inputs)
    result = run_dcmtk("dcmsend", "-aec", AE_TITLE, "+r", "+sd", "-nh", "127.0.0.1",
                       str(node.port), str(inputs), timeout=120)
    assert result.returncode == 0, f"{result.stdout}\n--- server ---\n{node.log()}"
    index = node.index()
    assert set(loaded.sops) | set(loaded.compressed) <= set(index)
    return node, loaded


def _keys(**keys: str | list[str]) -> list[str]:
    args = []
    for keyword, value in keys.items():
        text = "\\".join(value) if isinstance(value, list) else value
        args += ["-k", f"{keyword}={text}"]
    return args


def _received(folder: Path) -> dict[str, bytes]:
    """Part 10 files in ``folder`` by SOP Instance UID."""
    found = {}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        found[str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)] \
            = data
    return found


def _assert_as_stored(node: Node, received: dict[str, bytes]) -> None:
    """Each received data set is the stored object's data set, and in its syntax."""
    index = node.index()
    for sop, data in received.items():
        row = index[sop]
        stored = node.object_path(row).read_bytes()
        assert dataset_bytes(data) == dataset_bytes(stored), f"{sop} differs from the stored"
        received_syntax = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True) \
            .file_meta.TransferSyntaxUID
        assert received_syntax == row.transfer_syntax


#: (model flag, level, keys for the level, expected instances), both models.
CASES: list[tuple[str, str, Callable[[Loaded], dict], Callable[[Loaded], list[str]]]] = [
    ("-P", "PATIENT", lambda d: {"PatientID": d.patient_id}, lambda d: d.sops),
    ("-P", "STUDY", lambda d: {"PatientID": d.patient_id, "StudyInstanceUID": d.study},
     lambda d: d.sops),
    ("-P", "SERIES", lambda d: {"PatientID": d.patient_id, "StudyInstanceUID": d.study,
                                "SeriesInstanceUID": d.series_uid(1)},
     lambda d: d.series[d.series_uid(1)]),
    ("-P", "IMAGE", lambda d: {"PatientID": d.patient_id, "StudyInstanceUID": d.study,
                               "SeriesInstanceUID": d.series_uid(0),
                               "SOPInstanceUID": d.series[d.series_uid(0)][:2]},
     lambda d: d.series[d.series_uid(0)][:2]),
    ("-S", "STUDY", lambda d: {"StudyInstanceUID": d.study}, lambda d: d.sops),
    ("-S", "SERIES", lambda d: {"StudyInstanceUID": d.study,
                                "SeriesInstanceUID": list(d.series)},
     lambda d: d.sops),
    ("-S", "IMAGE", lambda d: {"StudyInstanceUID": d.study,
                               "SeriesInstanceUID": d.series_uid(1),
                               "SOPInstanceUID": d.series[d.series_uid(1)][2]},
     lambda d: [d.series[d.series_uid(1)][2]]),
]
IDS = [f"{'patient' if m == '-P' else 'study'}-{level.lower()}" for m, level, _, _ in CASES]


@pytest.mark.parametrize(("model", "level", "keys", "expected"), CASES, ids=IDS)
def test_movescu_to_storescp(qr: tuple[Node, Loaded], storescp: StoreSCP, model: str,
                             level: str, keys: Callable[[Loaded], dict],
                             expected: Callable[[Loaded], list[str]]) -> None:
    node, loaded = qr

    result = run_dcmtk("movescu", "-v", "-aet", "MOVESCU", "-aec", AE_TITLE, "-aem",
                       STORESCP_AET, model, "-k", f"QueryRetrieveLevel={level}",
                       *_keys(**keys(loaded)), "127.0.0.1", str(node.port), timeout=120)

    assert result.returncode == 0, f"{result.stdout}\n--- server ---\n{node.log()}"
    assert "Received Final Move Response (Success)" in result.stdout, result.stdout
    received = _received(storescp.folder)
    assert sorted(received) == sorted(expected(loaded))
    _assert_as_stored(node, received)


@pytest.mark.parametrize(("model", "level", "keys", "expected"), CASES, ids=IDS)
def test_getscu(qr: tuple[Node, Loaded], tmp_path: Path, model: str, level: str,
                keys: Callable[[Loaded], dict],
                expected: Callable[[Loaded], list[str]]) -> None:
    node, loaded = qr

    result = run_dcmtk("getscu", "-v", "-aec", AE_TITLE, model, "+B", "-od", str(tmp_path),
                       "-k", f"QueryRetrieveLevel={level}", *_keys(**keys(loaded)),
                       "127.0.0.1", str(node.port), timeout=120)

    assert result.returncode == 0, f"{result.stdout}\n--- server ---\n{node.log()}"
    assert "Received C-GET Response (Success)" in result.stdout, result.stdout
    received = _received(tmp_path)
    assert sorted(received) == sorted(expected(loaded))
    assert getscu_counts(result.stdout) == (0, len(received), 0, 0)
    _assert_as_stored(node, received)


#: SOP Instance UID lists whose encoding trips a reader that does not follow the
#: negotiated syntax: in Explicit VR (``-xe``) over 64 KB, which dcmtk sends as UN (a
#: UI element's 16-bit length cannot hold it, PS3.5 6.2.2); in Implicit VR (``-xi``) a
#: first element whose length's low bytes spell "DS", as an explicit VR would.
UID_LISTS = [pytest.param("-xe", 70_000, id="explicit-over-64KB"),
             pytest.param("-xi", 0x5344, id="implicit-length-spells-DS")]


def _uid_list_query(loaded: Loaded, length: int, folder: Path) -> tuple[Path, list[str]]:
    """A query file: IMAGE level, a SOP Instance UID list of ``length`` bytes (its
    first element) with two stored instances at its ends; and those two."""
    wanted = [loaded.sops[0], loaded.sops[-1]]
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.SOPInstanceUID = [*uid_list_of_length(wanted[:1], length - len(wanted[1]) - 1),
                            wanted[1]]
    path = folder / "query.dcm"
    # Explicit VR, which dcmtk recognises in a file without meta information; it
    # encodes the identifier again in the syntax the node accepted.
    query.save_as(path, implicit_vr=False, little_endian=True)
    return path, wanted


# getscu (3.6.7) proposes Explicit VR for its query context whatever -xi says: only
# movescu sends the implicit case.
@pytest.mark.parametrize(("proposed", "length"), UID_LISTS[:1])
def test_getscu_with_a_uid_list_over_64kb(qr: tuple[Node, Loaded], tmp_path: Path,
                                          proposed: str, length: int) -> None:
    """Exactly the listed instances, the first and the last of the list included."""
    node, loaded = qr
    query, wanted = _uid_list_query(loaded, length, tmp_path)
    received_in = tmp_path / "received"
    received_in.mkdir()

    result = run_dcmtk("getscu", "-v", "-aec", AE_TITLE, "-S", proposed, "+B", "-od",
                       str(received_in), "127.0.0.1", str(node.port), str(query),
                       timeout=120)

    assert result.returncode == 0, f"{result.stdout}\n--- server ---\n{node.log()}"
    assert "Received C-GET Response (Success)" in result.stdout, result.stdout
    received = _received(received_in)
    assert sorted(received) == sorted(wanted)
    assert getscu_counts(result.stdout) == (0, 2, 0, 0)
    _assert_as_stored(node, received)


@pytest.mark.parametrize(("proposed", "length"), UID_LISTS)
def test_movescu_with_a_uid_list_in_either_vr_encoding(qr: tuple[Node, Loaded],
                                                       storescp: StoreSCP, tmp_path: Path,
                                                       proposed: str, length: int) -> None:
    """Exactly the listed instances, the first and the last of the list included."""
    node, loaded = qr
    query, wanted = _uid_list_query(loaded, length, tmp_path)

    result = run_dcmtk("movescu", "-v", "-aec", AE_TITLE, "-aem", STORESCP_AET, "-S",
                       proposed, "127.0.0.1", str(node.port), str(query), timeout=120)

    assert result.returncode == 0, f"{result.stdout}\n--- server ---\n{node.log()}"
    assert "Received Final Move Response (Success)" in result.stdout, result.stdout
    received = _received(storescp.folder)
    assert sorted(received) == sorted(wanted)
    _assert_as_stored(node, received)


def test_movescu_compressed_as_stored(qr: tuple[Node, Loaded], storescp: StoreSCP) -> None:
    """storescp takes every syntax: the compressed objects go as stored (no decoding)."""
    node, loaded = qr

    result = run_dcmtk("movescu", "-v", "-aec", AE_TITLE, "-aem", STORESCP_AET, "-S",
                       *_keys(QueryRetrieveLevel="STUDY",
                              StudyInstanceUID=loaded.compressed_study),
                       "127.0.0.1", str(node.port), timeout=120)

    assert result.returncode == 0, f"{result.stdout}\n--- server ---\n{node.log()}"
    received = _received(storescp.folder)
    assert sorted(received) == sorted(loaded.compressed)
    _assert_as_stored(node, received)


def test_getscu_decompresses_what_it_did_not_negotiate(qr: tuple[Node, Loaded],
                                                       tmp_path: Path) -> None:
    """getscu proposes uncompressed syntaxes by default: compressed objects are
    decompressed, with pixel data equal to pydicom's decoding of the originals."""
    node, loaded = qr

    result = run_dcmtk("getscu", "-v", "-aec", AE_TITLE, "-S", "-od", str(tmp_path),
                       *_keys(QueryRetrieveLevel="STUDY",
                              StudyInstanceUID=loaded.compressed_study),
                       "127.0.0.1", str(node.port), timeout=120)

    assert result.returncode == 0, f"{result.stdout}\n--- server ---\n{node.log()}"
    received = _received(tmp_path)
    assert sorted(received) == sorted(loaded.compressed)
    for sop, data in received.items():
        got = pydicom.dcmread(io.BytesIO(data))
        assert not got.file_meta.TransferSyntaxUID.is_compressed
        original = loaded.compressed[sop]
        assert np.array_equal(got.pixel_array, original.pixel_array), sop


def test_getscu_preferring_jpeg_lossless_gets_every_object(qr: tuple[Node, Loaded],
                                                           tmp_path: Path) -> None:
    """getscu preferring JPEG Lossless (+xs) proposes one context per SOP class with JPEG
    Lossless and the uncompressed syntaxes: the node accepts Explicit VR Little Endian
    there (pacs.dimse.contexts.needs_sendable_first), so every object of the study
    arrives - decompressed, the JPEG Lossless one too - where accepting JPEG Lossless
    would have failed all the others."""
    node, loaded = qr

    result = run_dcmtk("getscu", "-v", "-aec", AE_TITLE, "-S", "+xs", "-od", str(tmp_path),
                       *_keys(QueryRetrieveLevel="STUDY",
                              StudyInstanceUID=loaded.compressed_study),
                       "127.0.0.1", str(node.port), timeout=120)

    assert result.returncode == 0, f"{result.stdout}\n--- server ---\n{node.log()}"
    assert "Received C-GET Response (Success)" in result.stdout, result.stdout
    received = _received(tmp_path)
    assert sorted(received) == sorted(loaded.compressed)
    assert getscu_counts(result.stdout) == (0, len(received), 0, 0)
    for sop, data in received.items():
        got = pydicom.dcmread(io.BytesIO(data))
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, sop
        assert np.array_equal(got.pixel_array, loaded.compressed[sop].pixel_array), sop


def test_movescu_unknown_destination(qr: tuple[Node, Loaded]) -> None:
    node, loaded = qr

    result = run_dcmtk("movescu", "-v", "-aec", AE_TITLE, "-aem", "NOWHERE", "-S",
                       *_keys(QueryRetrieveLevel="STUDY", StudyInstanceUID=loaded.study),
                       "127.0.0.1", str(node.port), timeout=60)

    assert "Received Final Move Response (Refused: MoveDestinationUnknown)" \
        in result.stdout, result.stdout



#: What each uncompressed-only destination accepts, the preferred conversion target first.
UNCOMPRESSED_ONLY = {"UNCOMPR": (ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                 "1.2.840.10008.1.2.2"),
                     "IMPLICIT": (ImplicitVRLittleEndian,)}


@pytest.mark.parametrize("aet", list(UNCOMPRESSED_ONLY))
def test_movescu_to_uncompressed_only_storescp(qr: tuple[Node, Loaded],
                                               storescps: dict[str, StoreSCP],
                                               aet: str) -> None:
    """A destination without the compressed syntaxes gets the compressed objects
    decompressed, with pixel data equal to pydicom's decoding of the originals; an
    uncompressed object goes as stored when the destination takes its syntax, else
    converted (IMPLICIT takes implicit VR only)."""
    node, loaded = qr
    scp = storescps[aet]
    scp.clear()
    accepted = UNCOMPRESSED_ONLY[aet]

    result = run_dcmtk("movescu", "-v", "-aec", AE_TITLE, "-aem", aet, "-P",
                       *_keys(QueryRetrieveLevel="PATIENT", PatientID="QR-COMPRESSED"),
                       "127.0.0.1", str(node.port), timeout=120)
    assert result.returncode == 0, f"{result.stdout}\n--- server ---\n{node.log()}"
    assert "Received Final Move Response (Success)" in result.stdout, result.stdout
    result = run_dcmtk("movescu", "-v", "-aec", AE_TITLE, "-aem", aet, "-S",
                       *_keys(QueryRetrieveLevel="SERIES", StudyInstanceUID=loaded.study,
                              SeriesInstanceUID=loaded.series_uid(0)),
                       "127.0.0.1", str(node.port), timeout=120)
    assert result.returncode == 0, f"{result.stdout}\n--- server ---\n{node.log()}"

    received = _received(scp.folder)
    assert sorted(received) == sorted([*loaded.compressed,
                                       *loaded.series[loaded.series_uid(0)]])
    index = node.index()
    for sop, data in received.items():
        stored_syntax = index[sop].transfer_syntax
        as_stored = stored_syntax in accepted
        got = pydicom.dcmread(io.BytesIO(data))
        assert got.file_meta.TransferSyntaxUID == (
            stored_syntax if as_stored else accepted[0]), sop
        original = pydicom.dcmread(node.object_path(index[sop]))
        assert got.SOPInstanceUID == original.SOPInstanceUID
        assert np.array_equal(got.pixel_array, original.pixel_array), sop
        if as_stored:
            _assert_as_stored(node, {sop: data})
