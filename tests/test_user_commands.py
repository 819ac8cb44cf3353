"""The consent and export commands, as a user runs them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from experiments import check_data, export_data
from experiments import consent as consent_cli
from fl.data import consent
from tests.data.datasets import add_broken_files


def test_consent_command_grants_revokes_and_deletes(tmp_path, capsys):
    device = tmp_path / "device-00003"
    device.mkdir()
    assert consent_cli.main(["show", "--device-dir", str(device)]) == 0
    assert "consent_default applies" in capsys.readouterr().out
    assert consent_cli.main(["grant", "--device-dir", str(device), "--photos", "photo-0000",
                             "photo-0001", "--purposes", "federated-training"]) == 0
    assert consent_cli.main(["revoke", "--device-dir", str(device), "--photos",
                             "photo-0001"]) == 0
    later = datetime.now(UTC) + timedelta(seconds=1)
    decision = consent.decide(consent.read_manifest(device), "deny",
                              ["photo-0000", "photo-0001", "photo-0002"], ["photo-0000"],
                              now=later)
    assert decision.train == (True, False, False) and decision.heldout == (False,)
    assert consent_cli.main(["delete", "--device-dir", str(device)]) == 0
    assert consent.read_manifest(device).delete_my_data
    (device / consent.MANIFEST).write_text("{oops")
    assert consent_cli.main(["show", "--device-dir", str(device)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_consent_command_refuses_a_missing_directory_and_a_bad_expiry(tmp_path, capsys):
    """A typo in --device-dir would write a manifest no device reads; a bad
    --expires is a message, not a traceback. Neither writes anything."""
    typo = tmp_path / "device-0003"
    assert consent_cli.main(["grant", "--device-dir", str(typo), "--photos", "photo-0000"]) == 2
    assert "is not a directory" in capsys.readouterr().err and not typo.exists()
    device = tmp_path / "device-00003"
    device.mkdir()
    for expires, message in [("next tuesday", "not an ISO 8601 time"),
                             ("2001-01-01T00:00:00+00:00", "that time has passed")]:
        assert consent_cli.main(["grant", "--device-dir", str(device), "--photos",
                                 "photo-0000", "--expires", expires]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert consent.read_manifest(device) is None
    later = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    assert consent_cli.main(["grant", "--device-dir", str(device), "--photos", "photo-0000",
                             "--expires", later]) == 0
    assert consent.read_manifest(device).photos["photo-0000"].expires.isoformat() == later


def test_export_command_writes_a_loadable_layout(tmp_path):
    assert export_data.main(["--layout", "folders", "--out", str(tmp_path / "f"), "--people",
                             "2", "--photos", "3"]) == 0
    assert len(list((tmp_path / "f").glob("Person_*/*.jpg"))) == 6
    assert (tmp_path / "f" / "controls.csv").is_file()


def test_check_data_lists_what_devices_would_skip(tmp_path, capsys):
    root = tmp_path / "lfw"
    export_data.main(["--layout", "folders", "--out", str(root), "--people", "2", "--photos", "6"])
    add_broken_files(root / "Person_0000", root / "Person_0000" / "Person_0000_0001.jpg")
    code = check_data.main(["data=folders", f"data.root={root}", "data.photos_min=3",
                            "data.heldout_photos=2", "devices.consent_default=deny",
                            "fleet.devices_per_round=1", "fleet.eval_devices=1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "device-00000  skipped    Person_0000/notes.txt: not an image file" in out
    assert "converted  Person_0000/cmyk.jpg: CMYK to RGB" in out
    assert "2 devices (folders): 4 files skipped, 4 converted, 0 devices excluded" in out
