"""``pacs import`` given hostile files: nothing that is not a regular file is read,
links below a folder are not followed, and what it could not read is reported."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from pacs.cli import import_files, main
from tests.conftest import nest_past_path_max, sample


def test_links_below_a_folder_are_yielded_as_themselves(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "ct.dcm").write_bytes(b"x")
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.dcm").write_bytes(b"x")
    (folder / "file-link").symlink_to(outside / "ct.dcm")
    (folder / "folder-link").symlink_to(outside)
    unreadable: list[tuple[Path, str]] = []
    found = list(import_files((str(folder), str(folder / "file-link")), unreadable))
    assert found == [(folder / "file-link", folder), (folder / "folder-link", folder),
                     (folder / "sub" / "a.dcm", folder),
                     (folder / "file-link", None)]  # named on the command line
    assert unreadable == []


def test_a_folder_too_deep_to_walk_is_reported(tmp_path: Path) -> None:
    """Folders nested past PATH_MAX (20 names of 250 characters): the walk cannot list
    the deepest, which is reported, not passed over in silence."""
    nest_past_path_max(tmp_path, "ct.dcm")
    unreadable: list[tuple[Path, str]] = []
    assert list(import_files((str(tmp_path),), unreadable)) == []
    assert [reason for _, reason in unreadable] == ["File name too long"]


def test_import_refuses_a_fifo_a_link_and_a_strange_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FIFO (an open would wait for ever), a link to /dev/zero (would read for ever)
    and a name with a newline and a byte that is not UTF-8: each refused on one line
    of the report; the valid file is stored; exit status 1."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PACS_DATA_DIR", str(tmp_path / "data"))
    folder = tmp_path / "in"
    folder.mkdir()
    os.mkfifo(folder / "fifo.dcm")
    (folder / "zero.dcm").symlink_to("/dev/zero")
    with open(os.path.join(os.fsencode(folder), b"a\xff\nb.dcm"), "wb") as odd:
        odd.write(b"junk")
    (folder / "ct.dcm").write_bytes(sample("CT_small.dcm").read_bytes())
    result = CliRunner().invoke(main, ["import", "--quiet", str(folder)])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("stored: 1,") and lines[0].endswith("rejected: 3")
    assert sorted(lines[1:]) == [
        f"rejected {folder}/a\\xff\\nb.dcm: not a DICOM Part 10 object (no preamble "
        "and DICM prefix)",
        f"rejected {folder}/fifo.dcm: not a regular file (a FIFO, socket, device or "
        "folder); not read",
        f"rejected {folder}/zero.dcm: a link, not followed"]


def test_a_file_gone_before_it_is_read_is_no_rejection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file removed between the listing and its reading (an upload folder's watcher
    took it) is counted apart, not reported rejected: exit status 0."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PACS_DATA_DIR", str(tmp_path / "data"))
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "ct.dcm").write_bytes(sample("CT_small.dcm").read_bytes())
    (folder / "taken.dcm").write_bytes(b"soon gone")
    from pacs.core.ingest import Ingest
    original = Ingest.store_file

    def taken_meanwhile(self: Ingest, path: Path, **kwargs: object) -> object:
        if path.name == "taken.dcm":
            path.unlink()
        return original(self, path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Ingest, "store_file", taken_meanwhile)
    result = CliRunner().invoke(main, ["import", "--quiet", str(folder)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].endswith(
        "rejected: 0, gone before they were read: 1")


@pytest.mark.parametrize("command", [
    ["query", "--level", "study"], ["delete", "1.2.3"], ["send", "--to", "X", "--requeue"],
    ["status"]])
def test_commands_that_read_the_index_make_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]) -> None:
    """A wrong PACS_DATA_DIR (or --customer) is an error, not an empty index made
    there and answered from ("0 study rows")."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PACS_DATA_DIR", str(tmp_path / "wrong"))
    result = CliRunner().invoke(main, command)
    assert result.exit_code != 0 and "no index at" in result.output, result.output
    assert not (tmp_path / "wrong").exists()


@pytest.mark.parametrize("command", [
    ["query", "--level", "study"], ["delete", "1.2.3"], ["send", "--to", "X", "--requeue"],
    ["status"], ["fsck", "--repair"]])
def test_commands_that_read_the_index_refuse_an_empty_index_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]) -> None:
    """An index file emptied (0 bytes) over a store that holds objects: ``pacs serve``
    refuses it, and so does every command that reads the index.  Made into an empty
    index there, it passed for a valid one from then on, and the node started over the
    store with every acknowledged instance out of sight."""
    _imported(tmp_path, monkeypatch)
    index = tmp_path / "data" / "index.sqlite"
    for index_file in (tmp_path / "data").glob("index.sqlite-*"):
        index_file.unlink()
    index.write_bytes(b"")
    result = CliRunner().invoke(main, command)
    assert result.exit_code != 0 and "is empty" in result.output, result.output
    assert index.stat().st_size == 0
    refused = CliRunner().invoke(main, ["import", "--quiet", str(tmp_path / "in")])
    assert refused.exit_code != 0 and "object store holds objects" in refused.output


def _imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A node's data folder in ``tmp_path`` (the working folder) holding one CT imported
    by ``pacs import`` and moved to its object folder; the folder imported."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PACS_DATA_DIR", str(tmp_path / "data"))
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "ct.dcm").write_bytes(sample("CT_small.dcm").read_bytes())
    assert CliRunner().invoke(main, ["import", "--quiet", str(folder)]).exit_code == 0
    return folder


def test_an_import_over_a_store_whose_index_is_lost_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The index gone (moved aside, a wrong PACS_DATA_DIR over another's store) while
    the store holds objects: an import refuses, as ``pacs serve`` does, instead of
    making an index that hides them and writing over those it cannot see."""
    folder = _imported(tmp_path, monkeypatch)
    for index_file in (tmp_path / "data").glob("index.sqlite*"):
        index_file.unlink()
    result = CliRunner().invoke(main, ["import", "--quiet", str(folder)])
    assert result.exit_code != 0 and "object store holds objects" in result.output, \
        result.output
    assert not (tmp_path / "data" / "index.sqlite").exists()


def test_reindex_from_an_empty_store_refuses_before_it_moves_anything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The object folder empty (a volume not mounted): ``pacs reindex`` refuses before
    it moves the intake there or swaps an empty index in; the index keeps its row."""
    _imported(tmp_path, monkeypatch)
    objects = tmp_path / "data" / "objects"
    objects.rename(tmp_path / "unmounted")
    objects.mkdir()
    result = CliRunner().invoke(main, ["reindex", "--quiet", "--jobs", "0"])
    assert result.exit_code == 1 and "nothing rebuilt" in result.output, result.output
    status = CliRunner().invoke(main, ["query", "--level", "image"])
    assert "(1 image row)" in status.output, status.output


@pytest.mark.parametrize("command", [["serve", "--workers", "-2"],
                                     ["query", "--level", "study", "--limit", "0"]])
def test_counts_out_of_range_are_usage_errors(command: list[str]) -> None:
    """No DIMSE worker at all (``--workers -2``: the port open, nobody answering), or
    a query limit of none (``--limit 0`` printed "0 study rows" over matches)."""
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 2 and "Invalid value" in result.output, result.output


def test_an_import_is_in_the_audit_trail_without_file_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Data Import (PS3.15 A.5.3.5) per patient: the operator (login name at this
    host) as its requestor, this host's file system as the Source Media, the study with
    its SOP class counted, the patient the instance names; outcome 4 when a file was
    refused.  The paths, which may name a patient, are nowhere in the trail."""
    import getpass
    import socket

    import pydicom

    from tests.auditcheck import problems, read_trail, requestor

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PACS_DATA_DIR", str(tmp_path / "data"))
    folder = tmp_path / "DOE^JOHN"
    folder.mkdir()
    (folder / "ct.dcm").write_bytes(sample("CT_small.dcm").read_bytes())
    (folder / "junk.dcm").write_bytes(b"junk")
    result = CliRunner().invoke(main, ["import", "--quiet", str(folder)])
    assert result.exit_code == 1, result.output
    trail = tmp_path / "data" / "audit.jsonl"
    (event,) = read_trail(trail)
    assert problems(event) == []
    assert event["EventIdentification"]["EventID"]["originalText"] == "Import"
    assert event["EventIdentification"]["EventOutcomeIndicator"] == 4
    assert requestor(event)["UserID"] == getpass.getuser()
    media = event["ActiveParticipant"][-1]
    assert media["UserID"] == f"file://{socket.gethostname()}/"
    ct = pydicom.dcmread(sample("CT_small.dcm"))
    study, patient = event["ParticipantObjectIdentification"]
    assert study["ParticipantObjectID"] == ct.StudyInstanceUID
    assert study["ParticipantObjectDescription"] == {
        "SOPClass": [{"UID": ct.SOPClassUID, "NumberOfInstances": 1}]}
    assert patient["ParticipantObjectID"].split("^")[0] == ct.PatientID
    assert b"DOE" not in trail.read_bytes() and b".dcm" not in trail.read_bytes()


def test_an_import_with_the_trail_off_writes_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PACS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PACS_AUDIT_LOG", "off")
    (tmp_path / "ct.dcm").write_bytes(sample("CT_small.dcm").read_bytes())
    result = CliRunner().invoke(main, ["import", "--quiet", str(tmp_path / "ct.dcm")])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "data" / "audit.jsonl").exists()


def test_an_operator_without_a_login_name_still_imports(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user id with no passwd entry (``docker compose exec`` with DOCKER_UID): the
    trail names it ``uid:<n>``, and the import is done, not a traceback."""
    import getpass

    from tests.auditcheck import read_trail, requestor

    def no_name() -> str:
        raise KeyError("getpwuid(): uid not found: 12345")

    monkeypatch.setattr(getpass, "getuser", no_name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PACS_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "ct.dcm").write_bytes(sample("CT_small.dcm").read_bytes())
    result = CliRunner().invoke(main, ["import", "--quiet", str(tmp_path / "ct.dcm")])
    assert result.exit_code == 0, result.output
    (event,) = read_trail(tmp_path / "data" / "audit.jsonl")
    assert requestor(event)["UserID"] == f"uid:{os.getuid()}"


def test_a_folder_swapped_for_a_link_after_the_walk_is_not_followed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer of the imported folder swaps one of its folders for a link (to another
    customer's objects, say) after the walk listed it: the file is opened from the
    named folder one name at a time, no link followed, and refused, never imported."""
    import pacs.cli as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PACS_DATA_DIR", str(tmp_path / "data"))
    secret = tmp_path / "other-customer-objects"
    secret.mkdir()
    (secret / "a.dcm").write_bytes(sample("CT_small.dcm").read_bytes())
    folder = tmp_path / "incoming"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.dcm").write_bytes(b"not DICOM")
    listed = cli.import_files

    def listing_then_swap(paths: tuple[str, ...], unreadable: list[tuple[Path, str]]
                          ) -> Iterator[tuple[Path, Path | None]]:
        files = list(listed(paths, unreadable))
        os.rename(folder / "sub", folder / "sub.old")
        (folder / "sub").symlink_to(secret)
        return iter(files)

    monkeypatch.setattr(cli, "import_files", listing_then_swap)
    result = CliRunner().invoke(main, ["import", "--quiet", str(folder)])
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[0].startswith("stored: 0,"), result.output
    assert "a folder on its path is a link" in result.output


def test_a_cd_s_dicomdir_is_passed_over_not_rejected(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A DICOM medium (PS3.10 8.6): its DICOMDIR is the index of its files, not an
    instance; the import stores the images, says it passed the DICOMDIR over, and
    exits 0 (a DICOMDIR was rejected as an instance without a valid SOP Class UID,
    so every CD's import exited 1)."""
    import pydicom
    from pydicom.fileset import FileSet

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PACS_DATA_DIR", str(tmp_path / "data"))
    medium = FileSet()
    medium.add(pydicom.dcmread(sample("CT_small.dcm")))
    medium.write(tmp_path / "cd")
    assert (tmp_path / "cd" / "DICOMDIR").is_file()
    result = CliRunner().invoke(main, ["import", "--quiet", str(tmp_path / "cd")])
    assert result.exit_code == 0, result.output
    assert "stored: 1," in result.output and "rejected: 0" in result.output
    assert "DICOMDIRs passed over: 1" in result.output
