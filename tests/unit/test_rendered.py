"""Drawing a decoded frame for /rendered and /thumbnail (adapters.dicomweb.rendered):
what it holds in memory beside the frame, and what it draws."""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_color_lut

from adapters.dicomweb import rendered
from tests.conftest import sample


def doc(photometric: str, bits_stored: int = 8, **values: float) -> dict[str, Any]:
    """The parsed metadata a frame is drawn with."""
    parsed: dict[str, Any] = {"00280004": {"vr": "CS", "Value": [photometric]},
                              "00280101": {"vr": "US", "Value": [bits_stored]}}
    tags = {"slope": "00281053", "intercept": "00281052"}
    for name, number in values.items():
        parsed[tags[name]] = {"vr": "DS", "Value": [number]}
    return parsed


def peak_of(call: Any) -> int:
    """Most bytes numpy and Python held at once during ``call()`` (tracemalloc)."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("shape, dtype, photometric", [
    ((4096, 4096), np.uint8, "MONOCHROME2"),  # was 13 times the frame (float32 copies)
    ((2048, 2048), np.uint16, "MONOCHROME1"),  # was 6.5 times
    ((1024, 2048, 3), np.uint16, "RGB"),  # was 8 times (int64 copies)
])
def test_drawing_a_frame_holds_at_most_another_frame(shape: tuple[int, ...], dtype: Any,
                                                     photometric: str) -> None:
    """PACS_MAX_FRAME_BYTES bounds the decoded frame; drawing it for display must not
    take a multiple of it: at most the 8-bit image and one band of intermediates."""
    frame = np.random.default_rng(3).integers(0, 4000, size=shape).astype(dtype)
    parsed = doc(photometric, 12, slope=2.0, intercept=-1024.0)
    peak = peak_of(lambda: rendered.draw(frame, parsed, rendered.Params()))
    assert peak < frame.nbytes + 8 * rendered.BAND_PIXELS * 4, (peak, frame.nbytes)


@pytest.mark.parametrize("window", [None, rendered.Window(300.0, 700.0),
                                    rendered.Window(300.0, 700.0, "sigmoid"),
                                    rendered.Window(300.0, 700.0, "linear-exact")])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_bands_draw_what_the_whole_frame_would(monkeypatch: pytest.MonkeyPatch,
                                               window: rendered.Window | None,
                                               photometric: str) -> None:
    """Modality LUT, VOI and MONOCHROME1 per pixel (PS3.3 C.11), drawn in bands of
    a few rows (an odd band size, so bands split rows unevenly)."""
    monkeypatch.setattr(rendered, "BAND_PIXELS", 7 * 37)
    frame = np.random.default_rng(5).integers(-2000, 3000, size=(61, 37)).astype(np.int16)
    parsed = doc(photometric, 16, slope=0.5, intercept=100.0)
    values = frame.astype(np.float32) * 0.5 + 100.0
    chosen = window or rendered.Window(
        (float(values.min()) + float(values.max())) / 2 + 0.5,
        max(float(values.max()) - float(values.min()), 1.0) + 1)
    expected = rendered.voi(values, chosen)
    if photometric == "MONOCHROME1":
        expected = 255 - expected
    assert np.array_equal(rendered.grey(frame, parsed, window), expected)
    colour = np.random.default_rng(6).integers(0, 4096, size=(61, 37, 3)).astype(np.uint16)
    assert np.array_equal(rendered.colour(colour, doc("RGB", 12)),
                          (colour >> 4).astype(np.uint8))


def test_a_palette_with_16_bit_entries_is_drawn_from_their_high_bytes() -> None:
    """PS3.3 C.7.6.3.1.5: the palette's entries are 16 bits here (descriptor 256\\0\\16)
    for 8-bit indices; drawn from Bits Stored (8) they were clipped at 255, white."""
    ds = pydicom.dcmread(sample("OBXXXX1A.dcm"))
    assert ds.RedPaletteColorLookupTableDescriptor[2] == 16
    image = rendered.draw(ds.pixel_array, doc("PALETTE COLOR", 8), rendered.Params(), ds)
    expected = (apply_color_lut(ds.pixel_array, ds) >> 8).astype(np.uint8)
    assert np.array_equal(np.asarray(image), expected)
    assert 0 < np.asarray(image).mean() < 64  # an ultrasound sector: mostly black


def _described(ds: pydicom.Dataset) -> dict[str, Any]:
    """The instance's metadata as the node keeps it (DICOM JSON, parsed)."""
    from pacs.core import dataset, metadata
    from tests.factory import part10

    data = part10(ds)
    return metadata.parse(metadata.prepare(dataset.read_part10(data), data).json)


#: The frame of :func:`_grey_ramp`.
RAMP = (np.arange(64 * 64) % 4096).astype(np.uint16).reshape(64, 64)


def _grey_ramp(**attributes: Any) -> pydicom.Dataset:
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = RAMP.astype("<u2").tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_lut_sequences_are_applied_as_tables() -> None:
    """PS3.3 C.11.1, C.11.2: a Modality LUT Sequence and a VOI LUT Sequence are tables,
    not the linear rescale and window: a non-linear VOI LUT (16-bit entries, the
    square root) draws its output; a cubic Modality LUT comes before the window."""
    from pydicom.dataset import Dataset

    voi = Dataset()
    voi.LUTDescriptor = [4096, 0, 16]
    voi.LUTData = (np.sqrt(np.arange(4096) / 4095) * 65535).astype("<u2").tobytes()
    voi["LUTData"].VR = "OW"
    ds = _grey_ramp(VOILUTSequence=[voi])
    frame = RAMP
    image = np.asarray(rendered.draw(frame, _described(ds), rendered.Params(), ds))
    expected = np.sqrt(frame / 4095) * 255
    assert np.abs(image - expected).max() <= 1.01

    modality = Dataset()
    modality.LUTDescriptor = [4096, 0, 16]
    modality.LUTData = ((np.arange(4096) / 4095) ** 3 * 60000).astype("<u2").tobytes()
    modality["LUTData"].VR = "OW"
    modality.ModalityLUTType = "US"
    cubic = _grey_ramp(ModalityLUTSequence=[modality], WindowCenter=30000,
                       WindowWidth=60000)
    image = np.asarray(rendered.draw(frame, _described(cubic), rendered.Params(), cubic))
    values = (frame / 4095) ** 3 * 60000
    expected = np.clip((values - 29999.5) / 59999 + 0.5, 0, 1) * 255
    assert np.abs(image - expected).max() <= 1.01


def test_an_enhanced_frame_is_drawn_by_its_functional_groups() -> None:
    """PS3.3 C.7.6.16: an enhanced object keeps its window and rescale in the shared
    or per-frame functional groups (Frame VOI LUT, Pixel Value Transformation); the
    frame's own win over the shared ones."""
    from pydicom.dataset import Dataset

    def group(**values: Any) -> Dataset:
        item = Dataset()
        for keyword, value in values.items():
            setattr(item, keyword, value)
        return item

    shared = group(PixelValueTransformationSequence=[group(
        RescaleSlope=1, RescaleIntercept=-1024, RescaleType="HU")],
        FrameVOILUTSequence=[group(WindowCenter=40, WindowWidth=400)])
    second = group(FrameVOILUTSequence=[group(WindowCenter=1000, WindowWidth=2000)])
    ds = _grey_ramp(SharedFunctionalGroupsSequence=[shared],
                    PerFrameFunctionalGroupsSequence=[group(), second],
                    NumberOfFrames=1)
    doc = _described(ds)
    frame = RAMP
    for number, (center, width) in ((1, (40, 400)), (2, (1000, 2000))):
        image = np.asarray(rendered.draw(frame, rendered.frame_view(doc, number),
                                         rendered.Params()))
        values = frame.astype(float) - 1024
        expected = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255
        assert np.abs(image - expected).max() <= 1.01, number


@pytest.mark.parametrize("stored", [
    {"00281050": {"vr": "LO", "Value": ["abc"]}},
    {"00281050": {"vr": "DS", "Value": [40]}, "00281051": {"vr": "LO", "Value": ["wide"]}},
])
def test_a_stored_window_that_is_not_a_number_is_passed_over(stored: dict[str, Any]) -> None:
    """A Window Center or Width the sender wrote in another VR: the frame is drawn
    through its own range, as without a window (it was refused, 406)."""
    doc = {"00280004": {"vr": "CS", "Value": ["MONOCHROME2"]}, **stored}
    frame = np.arange(16, dtype=np.uint16).reshape(4, 4)
    assert rendered.default_window(doc, frame) == rendered.Window(8.0, 16.0, "linear")
    drawn = rendered.grey(frame, doc, None)
    assert drawn[0, 0] == 0 and drawn[-1, -1] == 255
