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
