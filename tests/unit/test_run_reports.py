"""Run tokens: what lets a running job's flow report its progress straight to the kiln API."""

from __future__ import annotations

import stat

import pytest

from kiln.run_reports import RunTokenRefused, read_run_token, run_key, run_token
from kiln.settings import KilnSettings


def test_a_token_reads_back_as_its_job_and_flow_run():
    token = run_token(b"k" * 32, "job-1", "run-1")
    assert read_run_token(b"k" * 32, token) == ("job-1", "run-1")


@pytest.mark.parametrize("token", [None, "", "job-1", "job-1.run-1", "job-1.run-1.", "job-1.run-1.00ff"])
def test_a_missing_or_malformed_token_is_refused_naming_the_header(token):
    with pytest.raises(RunTokenRefused, match="X-Kiln-Run-Token"):
        read_run_token(b"k" * 32, token)


def test_a_token_of_another_key_or_altered_is_refused():
    token = run_token(b"k" * 32, "job-1", "run-1")
    with pytest.raises(RunTokenRefused):
        read_run_token(b"other" * 8, token)
    with pytest.raises(RunTokenRefused):
        read_run_token(b"k" * 32, token.replace("job-1", "job-2", 1))
    with pytest.raises(RunTokenRefused):
        read_run_token(b"k" * 32, token.replace("run-1", "run-2", 1))


def test_the_run_key_is_written_once_for_the_owner_only_and_the_setting_wins(tmp_path):
    settings = KilnSettings(home=tmp_path)
    key = run_key(settings)
    assert len(key) == 64 and run_key(KilnSettings(home=tmp_path)) == key
    assert stat.S_IMODE((tmp_path / "run-key").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["run-key"]
    assert run_key(KilnSettings(home=tmp_path, run_key="set by the operator")) == b"set by the operator"
