"""The consent and export commands, as a user runs them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from experiments import consent as consent_cli
from experiments import export_data
from fl.data import consent


def test_consent_command_grants_revokes_and_deletes(tmp_path, capsys):
    device = tmp_path / "device-00003"
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


def test_export_command_writes_a_loadable_layout(tmp_path):
    assert export_data.main(["--layout", "folders", "--out", str(tmp_path / "f"), "--people",
                             "2", "--photos", "3"]) == 0
    assert len(list((tmp_path / "f").glob("Person_*/*.jpg"))) == 6
    assert (tmp_path / "f" / "controls.csv").is_file()
