"""The registry of ML models kiln offers, and the one place that loads their weights."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import InvalidRequest, ServerError

# matgl versions that reproduce matgl's own published test values with the shipped
# weights (shared/models/README.md): 2.2 changed TensorNet's message passing, and from
# then on the same folder loads without error but gives wrong energies.
SUPPORTED_MATGL = ((2, 0, 4), (2, 2, 0))  # [lowest, first unsupported)


@dataclass(frozen=True)
class ModelInfo:
    """What a model is, what it predicts and where its weights come from."""

    name: str = field(metadata={"description": "kiln's name for the model, as a job request gives it."})
    folder: str = field(metadata={"description": "The model's folder (matgl format) under the model directory."})
    architecture: str = field(metadata={"description": "The network, as matgl names it."})
    predicts: tuple[str, ...] = field(metadata={"description": "The ml_predict properties this model can answer."})
    units: dict[str, str] = field(hash=False, metadata={"description": "Unit of each quantity in the results."})
    training_data: str = field(metadata={"description": "The data set the model was trained on."})
    accuracy: str = field(metadata={"description": "Errors the model's authors report on their test set."})
    citation: str = field(metadata={"description": "What to cite when using the model's numbers."})
    licence: str = field(metadata={"description": "Licence of the weights; its text travels with the folder."})
    version: str = field(metadata={"description": "The matgl release that reads the weights, and the weights."})

    @property
    def elements(self) -> frozenset[str]:
        """The elements the model was trained on, read from the folder's model.json (no torch needed).

        The folder is looked for where this process last found the model (load_potential,
        available_models, model_path), else on the settings' models_path.
        """
        model_dir = _FOUND_IN.get(self.name)
        if model_dir is None:
            from kiln.settings import get_settings

            folder = model_path(self.name, get_settings().models_path)
        else:
            folder = model_dir / self.folder
        try:
            return _element_types(folder / "model.json")
        except FileNotFoundError:
            raise ModelNotInstalled(self.name, [folder]) from None

    def as_dict(self) -> dict[str, Any]:
        """The model as the API lists it."""
        return {
            "name": self.name,
            "architecture": self.architecture,
            "predicts": list(self.predicts),
            "units": dict(self.units),
            "elements": sorted(self.elements),
            "training_data": self.training_data,
            "accuracy": self.accuracy,
            "citation": self.citation,
            "licence": self.licence,
            "version": self.version,
        }


MODELS: dict[str, ModelInfo] = {
    info.name: info
    for info in [
        ModelInfo(
            name="tensornet-matpes-pbe",
            folder="TensorNet-MatPES-PBE-v2025.1-PES",
            architecture="TensorNet (O(3)-equivariant message passing, cutoff 5 Å) as a matgl Potential",
            predicts=("energy", "forces", "stress", "relax", "formation_energy"),
            units={"energy": "eV/atom", "total_energy": "eV", "forces": "eV/Å", "stress": "GPa"},
            training_data="MatPES-v2025.1-PBE: 300 K MD snapshots and Materials Project ground states computed "
            "with PBE (391,240 training, 21,735 validation, "
            "21,737 test structures)",
            accuracy="test MAE 42 meV/atom (energy), 146 meV/Å (forces), 0.63 GPa (stress)",
            citation="Aaron Kaplan, Runze Liu, Ji Qi, Tsz Wai Ko, Bowen Deng, Gerbrand Ceder, Kristin A. Persson, "
            "Shyue Ping Ong. A foundational potential energy surface dataset for materials. Submitted.",
            licence="BSD-3-Clause, Copyright (c) 2022 Materials Virtual Lab",
            version="matgl 2.1.2 / TensorNet-MatPES-PBE-v2025.1",
        ),
    ]
}

# model name -> the directory this process last found its folder in
_FOUND_IN: dict[str, Path] = {}


class UnknownModel(InvalidRequest):
    """The request names a model kiln does not offer."""

    def __init__(self, name: str):
        super().__init__(
            f"model: unknown model {name!r}; available models: {', '.join(sorted(MODELS))}",
            details={"available_models": sorted(MODELS)},
        )


class ModelNotInstalled(InvalidRequest):
    """kiln offers the model, but none of the model directories holds its folder."""

    def __init__(self, name: str, folders: Sequence[Path]):
        super().__init__(
            f"model: {name!r} is not installed here: no folder {', '.join(map(str, folders))}; put the matgl "
            f"model folder {folders[0].name!r} in KILN_MODEL_DIR (default KILN_HOME/models)"
        )


class UnsupportedMatgl(ServerError):
    """The installed matgl reads the weights without error but gives wrong numbers."""

    def __init__(self, installed: str):
        low, high = (".".join(map(str, v)) for v in SUPPORTED_MATGL)
        super().__init__(
            f"matgl {installed} is installed, but the shipped weights give correct energies only with "
            f"matgl >={low},<{high}; install matgl==2.1.2"
        )


def model_info(name: str) -> ModelInfo:
    """The registry entry for `name`, or UnknownModel."""
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModel(name) from None


def model_version(job_input: Any) -> dict[str, str | None]:
    """The version of the model a job names (a JobType's `versions`): part of its cache key."""
    model = MODELS.get(job_input.model)
    return {"model_version": model.version if model is not None else None}


def model_path(name: str, model_dirs: Path | Sequence[Path]) -> Path:
    """The folder holding `name`'s weights in the first of `model_dirs` that has it.

    `model_dirs` is one directory or a search path (the settings' models_path: KILN_MODEL_DIR, then
    the models shipped in the package); ModelNotInstalled when none holds the folder.
    """
    info = model_info(name)
    if isinstance(model_dirs, (str, Path)):
        model_dirs = [model_dirs]
    searched = [Path(d).expanduser().resolve() for d in model_dirs]
    for model_dir in searched:
        if (model_dir / info.folder / "model.json").is_file():
            _FOUND_IN[name] = model_dir
            return model_dir / info.folder
    raise ModelNotInstalled(name, [model_dir / info.folder for model_dir in searched])


def available_models(model_dirs: Path | Sequence[Path]) -> list[ModelInfo]:
    """The models kiln offers whose folders are present in `model_dirs` (one directory or a search path)."""
    found = []
    for name, info in MODELS.items():
        try:
            model_path(name, model_dirs)
        except ModelNotInstalled:
            continue
        found.append(info)
    return found


def require_model(job_input: Any, settings: Any) -> None:
    """Refuse at submission a request naming a model this installation does not have."""
    model_path(job_input.model, settings.models_path)


def load_potential(name: str, model_dirs: Path | Sequence[Path]) -> Any:
    """`name`'s matgl Potential, loaded once per process and then shared by every job it runs.

    `load_potential.cache_info().misses` counts the loads actually done.
    """
    return _load_folder(model_path(name, model_dirs))


@functools.lru_cache(maxsize=4)
def _load_folder(folder: Path) -> Any:
    # torch and matgl take seconds to import: only a process that runs a model pays for it. Weights
    # come from the folder only; offline, matgl cannot fall back to fetching a model by name.
    os.environ["HF_HUB_OFFLINE"] = "1"
    import matgl

    installed = tuple(int(part) for part in matgl.__version__.split(".")[:3] if part.isdigit())
    if not SUPPORTED_MATGL[0] <= installed < SUPPORTED_MATGL[1]:
        raise UnsupportedMatgl(matgl.__version__)
    potential = matgl.load_model(folder)
    potential.eval()
    return potential


load_potential.cache_info = _load_folder.cache_info  # type: ignore[attr-defined]
load_potential.cache_clear = _load_folder.cache_clear  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=16)
def _element_types(model_json: Path) -> frozenset[str]:
    description = json.loads(model_json.read_text())
    return frozenset(description["kwargs"]["model"]["init_args"]["element_types"])
