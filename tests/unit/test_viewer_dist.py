"""Where ``pacs serve`` finds the OHIF dist: the setting, the source checkout, the
installation's data folder, in that order, and never the working folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs.core.config import Settings
from pacs.node import viewer


def make_dist(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "index.html").write_text("<html></html>")
    return folder


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A checkout, an installation prefix and a working folder, each with a dist."""
    found = {name: tmp_path / name for name in ("checkout", "prefix", "cwd")}
    make_dist(found["checkout"] / "vendor" / "ohif" / "dist")
    make_dist(found["prefix"] / "share" / "pacs" / "ohif" / "dist")
    make_dist(found["cwd"] / "vendor" / "ohif" / "dist")
    monkeypatch.setattr(viewer, "source_checkout", lambda: found["checkout"])
    monkeypatch.setattr(viewer.sys, "prefix", str(found["prefix"]))
    monkeypatch.chdir(found["cwd"])
    return found


def test_the_checkout_comes_first_and_the_working_folder_never(
        places: dict[str, Path]) -> None:
    found = viewer.find(Settings())
    assert found is not None and found.source == "the source checkout"
    assert found.folder == places["checkout"] / "vendor" / "ohif" / "dist"
    assert viewer.find_dist(Settings()) == found.folder
    assert all(not where.folder.is_relative_to(places["cwd"])
               for where in viewer.dist_locations(Settings()))


def test_the_installation_when_the_checkout_has_none(places: dict[str, Path]) -> None:
    (places["checkout"] / "vendor" / "ohif" / "dist" / "index.html").unlink()
    found = viewer.find(Settings())
    assert found is not None and found.source == "the installation"
    assert found.folder == places["prefix"] / "share" / "pacs" / "ohif" / "dist"
    assert str(found) == f"{found.folder} (from the installation)"


def test_an_installed_package_has_no_checkout(places: dict[str, Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(viewer, "source_checkout", lambda: None)
    assert [w.source for w in viewer.dist_locations(Settings())] == ["the installation"]


def test_the_setting_wins_and_is_not_replaced_when_missing(
        places: dict[str, Path], tmp_path: Path) -> None:
    chosen = make_dist(tmp_path / "chosen")
    found = viewer.find(Settings(viewer_dist=str(chosen)))
    assert found is not None and (found.folder, found.source) == (chosen, "PACS_VIEWER_DIST")
    missing = Settings(viewer_dist=str(tmp_path / "nothing"))
    assert viewer.find(missing) is None
    message = viewer.missing_message(missing)
    assert str(tmp_path / "nothing") in message and "scripts/fetch-ohif.sh" in message


def test_nothing_found_says_where_it_looked_and_how_to_get_it(
        places: dict[str, Path]) -> None:
    for where in viewer.dist_locations(Settings()):
        (where.folder / "index.html").unlink()
    assert viewer.find_dist(Settings()) is None
    message = viewer.missing_message(Settings())
    assert str(places["checkout"] / "vendor" / "ohif" / "dist") in message
    assert str(places["prefix"] / "share" / "pacs" / "ohif" / "dist") in message
    assert "scripts/fetch-ohif.sh --prefix" in message and "PACS_VIEWER_DIST" in message


def test_this_checkout_is_found_from_the_module_not_the_working_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = Path(__file__).resolve().parents[2]
    assert viewer.source_checkout() == root
