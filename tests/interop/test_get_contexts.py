"""C-GET of a mixed-syntax study by requestors that propose, in one storage context, a
compressed syntax and Explicit VR Little Endian (PS3.7 D.3.3.4, PS3.4 C.4.3).

The node stores objects as they were sent: here JPEG Baseline, JPEG 2000, JPEG-LS, RLE
and Explicit VR Little Endian, in four SOP classes.  A requestor offering, per SOP class,
one context with [JPEG Baseline, Explicit VR Little Endian] is given Explicit VR Little
Endian there, the only syntax every stored object can be sent in
(:func:`pacs.dimse.contexts.needs_sendable_first`): every instance arrives, decompressed
where it was stored compressed, with the stored object's pixels.  A requestor that also
proposes an uncompressed context of its own keeps JPEG Baseline in the other one, and the
JPEG Baseline object comes as stored.  Storage from a modality is unchanged: it is
stored in the compressed syntax it sent.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from tests.conftest import sample
from tests.factory import dataset_bytes
from tests.interop.conftest import (
    AE_TITLE,
    Node,
    getscu_counts,
    run_dcmtk,
)

pytestmark = [pytest.mark.interop, pytest.mark.dimse]

#: The study: pydicom test files, each stored in its own transfer syntax.
FILES = ("SC_rgb_jpeg_dcmtk.dcm",           # Secondary Capture, JPEG Baseline
         "US1_J2KR.dcm",                    # Ultrasound, JPEG 2000 lossless
         "MR_small_jp2klossless.dcm",       # MR, JPEG 2000 lossless
         "MR_small_jpeg_ls_lossless.dcm",   # MR, JPEG-LS lossless
         "MR_small_RLE.dcm",                # MR, RLE lossless
         "MR_small.dcm",                    # MR, Explicit VR Little Endian
         "CT_small.dcm")                    # CT, Explicit VR Little Endian
TIMEOUT = 120.0


@dataclass
class Mixed:
    """The stored study: UID, and each object (as read back from the node) by SOP UID."""

    study: str
    stored: dict[str, pydicom.Dataset] = field(repr=False)
    stored_bytes: dict[str, bytes] = field(repr=False)

    @property
    def classes(self) -> list[str]:
        return sorted({str(ds.SOPClassUID) for ds in self.stored.values()})

    def syntax(self, sop: str) -> str:
        return str(self.stored[sop].file_meta.TransferSyntaxUID)


@pytest.fixture(scope="module")
def mixed(node_factory: Callable[..., Node],
          tmp_path_factory: pytest.TempPathFactory) -> tuple[Node, Mixed]:
    """A node holding the mixed-syntax study, sent with dcmsend (stored as sent)."""
    node = node_factory("get-contexts")
    folder = tmp_path_factory.mktemp("get-contexts-inputs")
    study = generate_uid()
    sent_syntaxes = {}
    for n, name in enumerate(FILES):
        ds = pydicom.dcmread(sample(name))
        ds.PatientID = "GET-CONTEXTS"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / f"{n}.dcm", enforce_file_format=True)
        sent_syntaxes[ds.SOPInstanceUID] = str(ds.file_meta.TransferSyntaxUID)
    result = run_dcmtk("dcmsend", "-aec", AE_TITLE, "+sd", "-nh", "127.0.0.1",
                       str(node.port), str(folder), timeout=TIMEOUT)
    assert result.returncode == 0, f"{result.stdout}\n--- server ---\n{node.log()}"
    index = node.index()
    assert set(sent_syntaxes) <= set(index)
    stored, stored_bytes = {}, {}
    for sop, syntax in sent_syntaxes.items():
        # Storage negotiation still takes the modality's compressed syntax: as sent.
        assert index[sop].transfer_syntax == syntax, FILES
        stored_bytes[sop] = node.object_path(index[sop]).read_bytes()
        stored[sop] = pydicom.dcmread(io.BytesIO(stored_bytes[sop]))
    assert len({ds.file_meta.TransferSyntaxUID for ds in stored.values()}) == 5
    return node, Mixed(study, stored, stored_bytes)


@dataclass
class Retrieved:
    """What a pynetdicom C-GET requestor got: the final status and the objects."""

    final: Dataset
    objects: dict[str, Dataset]
    received_syntaxes: dict[str, str]


def _c_get(node: Node, study: str, contexts: list[tuple[str, list[str]]]) -> Retrieved:
    """C-GET the study, proposing ``contexts`` (SOP class, syntaxes) with the SCP role."""
    objects: dict[str, Dataset] = {}
    syntaxes: dict[str, str] = {}

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        objects[str(ds.SOPInstanceUID)] = ds
        syntaxes[str(ds.SOPInstanceUID)] = str(event.context.transfer_syntax)
        return 0x0000

    ae = AE(ae_title="GETCONTEXTS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class, proposed in contexts:
        ae.add_requested_context(sop_class, proposed)
    roles = [build_role(uid, scp_role=True) for uid in sorted({uid for uid, _ in contexts})]
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established, node.log()
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study
        replies = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    assert replies, "no C-GET response"
    final, _ = replies[-1]
    return Retrieved(final, objects, syntaxes)


def _assert_same_pixels(loaded: Mixed, received: dict[str, Dataset]) -> None:
    for sop, got in received.items():
        original = loaded.stored[sop]
        assert np.array_equal(got.pixel_array, original.pixel_array), \
            f"{sop} ({pydicom.uid.UID(loaded.syntax(sop)).name}): pixels differ"


def _final_counts(final: Dataset) -> tuple[int, int, int, int]:
    return (int(final.Status), int(final.get("NumberOfCompletedSuboperations", -1)),
            int(final.get("NumberOfFailedSuboperations", -1)),
            int(final.get("NumberOfWarningSuboperations", -1)))


def test_one_context_jpeg_baseline_and_explicit_gets_every_object(
        mixed: tuple[Node, Mixed]) -> None:
    """One context per SOP class, [JPEG Baseline, Explicit VR LE]: Explicit VR LE is
    accepted, every object is sent, decompressed where it was stored compressed."""
    node, loaded = mixed
    contexts = [(uid, [JPEGBaseline8Bit, ExplicitVRLittleEndian]) for uid in loaded.classes]

    got = _c_get(node, loaded.study, contexts)

    assert _final_counts(got.final) == (0x0000, len(FILES), 0, 0), \
        f"{got.final}\n--- server ---\n{node.log()}"
    assert sorted(got.objects) == sorted(loaded.stored)
    assert set(got.received_syntaxes.values()) == {ExplicitVRLittleEndian}
    _assert_same_pixels(loaded, got.objects)


def test_compressed_context_beside_an_uncompressed_one_sends_as_stored(
        mixed: tuple[Node, Mixed]) -> None:
    """Per SOP class [JPEG Baseline, Explicit VR LE] and [Explicit VR LE]: the first
    keeps JPEG Baseline, so the JPEG Baseline object comes as stored, the others
    through the second context."""
    node, loaded = mixed
    contexts = [(uid, syntaxes) for uid in loaded.classes
                for syntaxes in ([JPEGBaseline8Bit, ExplicitVRLittleEndian],
                                 [ExplicitVRLittleEndian])]

    got = _c_get(node, loaded.study, contexts)

    assert _final_counts(got.final) == (0x0000, len(FILES), 0, 0), \
        f"{got.final}\n--- server ---\n{node.log()}"
    assert sorted(got.objects) == sorted(loaded.stored)
    for sop, syntax in got.received_syntaxes.items():
        expected = JPEGBaseline8Bit if loaded.syntax(sop) == JPEGBaseline8Bit \
            else ExplicitVRLittleEndian
        assert syntax == expected, pydicom.uid.UID(loaded.syntax(sop)).name
    jpeg = next(sop for sop in loaded.stored if loaded.syntax(sop) == JPEGBaseline8Bit)
    assert got.objects[jpeg].PixelData == loaded.stored[jpeg].PixelData
    _assert_same_pixels(loaded, got.objects)


def test_getscu_preferring_jpeg_baseline_gets_every_object(mixed: tuple[Node, Mixed],
                                                           tmp_path: Path) -> None:
    """dcmtk getscu +xy proposes, per storage SOP class, one context [JPEG Baseline,
    Explicit VR LE, Explicit VR BE, Implicit VR LE] with the SCP role: every object
    arrives, uncompressed, with the stored pixels."""
    node, loaded = mixed

    result = run_dcmtk("getscu", "-v", "-aec", AE_TITLE, "-S", "+xy", "+B",
                       "-od", str(tmp_path),
                       "-k", "QueryRetrieveLevel=STUDY", "-k",
                       f"StudyInstanceUID={loaded.study}", "127.0.0.1", str(node.port),
                       timeout=TIMEOUT)

    assert result.returncode == 0, f"{result.stdout}\n--- server ---\n{node.log()}"
    assert "Received C-GET Response (Success)" in result.stdout, result.stdout
    assert getscu_counts(result.stdout) == (0, len(FILES), 0, 0), result.stdout
    files = {}
    for path in tmp_path.iterdir():
        data = path.read_bytes()
        files[str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
                  .SOPInstanceUID)] = data
    assert sorted(files) == sorted(loaded.stored)
    received = {sop: pydicom.dcmread(io.BytesIO(data)) for sop, data in files.items()}
    for sop, ds in received.items():
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, sop
        if loaded.syntax(sop) == ExplicitVRLittleEndian:
            # Stored in the accepted syntax: the data set byte for byte as stored.
            assert dataset_bytes(files[sop]) == dataset_bytes(loaded.stored_bytes[sop])
    _assert_same_pixels(loaded, received)
