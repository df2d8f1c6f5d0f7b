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


def test_the_shipped_model_is_found_when_no_model_dir_is_set(tmp_path, monkeypatch):
    from kiln.settings import SHIPPED_MODELS, KilnSettings
    from kiln.tasks.ml.models import MODELS, available_models, model_path

    monkeypatch.delenv("KILN_MODEL_DIR", raising=False)
    settings = KilnSettings(home=tmp_path)
    assert settings.models_path == (tmp_path.resolve() / "models", SHIPPED_MODELS)
    folder = model_path("tensornet-matpes-pbe", settings.models_path)
    assert folder == SHIPPED_MODELS / MODELS["tensornet-matpes-pbe"].folder
    assert (folder.parent / "LICENSE-matgl").read_text().startswith("BSD 3-Clause License")
    assert [m.name for m in available_models(settings.models_path)] == ["tensornet-matpes-pbe"]


def test_a_folder_in_the_model_dir_comes_before_the_shipped_one(tmp_path):
    from kiln.settings import SHIPPED_MODELS, KilnSettings
    from kiln.tasks.ml.models import MODELS, model_path

    info = MODELS["tensornet-matpes-pbe"]
    mine = tmp_path / "mine" / info.folder
    mine.mkdir(parents=True)
    (mine / "model.json").write_text((SHIPPED_MODELS / info.folder / "model.json").read_text())
    settings = KilnSettings(home=tmp_path, model_dir=tmp_path / "mine")
    assert model_path(info.name, settings.models_path) == mine
