"""What an installed kiln reads from its own files: the project file, the migrations, the shipped model."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.deployments.project import PROJECT_FILES, find_project_file


def test_the_project_file_is_found_in_a_checkout():
    assert find_project_file() == PROJECT_FILES[0] == Path(__file__).resolve().parents[2] / "prefect.yaml"


def test_a_missing_project_file_says_where_it_looked_and_what_to_do(tmp_path):
    candidates = (tmp_path / "prefect.yaml", tmp_path / "kiln" / "deployments" / "prefect.yaml")
    with pytest.raises(FileNotFoundError, match="reinstall it from a checkout") as caught:
        find_project_file(candidates)
    assert str(candidates[1]) in str(caught.value)
