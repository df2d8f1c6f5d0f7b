"""The `ml_predict` job: energies, forces, stresses, relaxations and formation energies from a matgl model."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prefect import flow

from kiln.runtime import report_progress
from kiln.schemas.job_types import JobType
from kiln.schemas.ml_predict import MLPredictInput
from kiln.settings import get_settings

FORCE_PROPERTIES = ("forces", "stress")
PROGRESS_INTERVAL_SECONDS = 1.0


@flow(name="ml_predict", persist_result=True, result_serializer="json")
async def ml_predict(
    model: str = "tensornet-matpes-pbe",
    structure: Any = None,
    structures: list[Any] | None = None,
    property: str = "energy",
    relax: dict | None = None,
    batch_size: int | None = None,
) -> dict:
    # An async flow whose work runs in a thread: Prefect's synchronous engine joins its heartbeat
    # thread at the end of every run, about 1 s per job here (measured in bench/ml_predict.py).
    return await asyncio.to_thread(
        predict_job, model, structure, structures, property, relax, batch_size
    )


def predict_job(
    model: str,
    structure: Any,
    structures: list[Any] | None,
    property: str,
    relax: dict | None,
    batch_size: int | None,
) -> dict:
    from pymatgen.core import Structure

    from kiln.tasks.ml import predict as ml
    from kiln.tasks.ml.models import MODELS, load_potential
    from kiln.tasks.ml.structures import domain_report

    request = MLPredictInput.read({
        "model": model, "structure": structure, "structures": structures, "property": property,
        **({"relax": relax} if relax else {}), "batch_size": batch_size,
    })
    info = MODELS[request.model]
    started = time.perf_counter()
    loads_before = load_potential.cache_info().misses
    potential = load_potential(request.model, get_settings().models_path)
    load_seconds = time.perf_counter() - started if load_potential.cache_info().misses > loads_before else 0.0

    parsed = request.parsed()
    crystals: list[Structure] = []
    notes: list[dict] = []
    for item in parsed:
        crystal = item.structure
        note: dict[str, Any] = {}
        if item.prototype:
            # a formula names a prototype, not a structure: relax it with the same potential first
            relaxed = ml.relax(potential, crystal, fmax=0.02, steps=500, relax_cell=True)
            crystal = Structure.from_dict(relaxed["structure"])
            note["prototype"] = f"{item.prototype}, relaxed with {info.name}"
        note.update(domain_report(crystal, set(info.elements)))
        crystals.append(crystal)
        notes.append(note)

    last_report = [0.0]

    def progress(done: int, total: int) -> None:
        # each report is a Prefect API call made while the model waits: at most one a second
        now = time.perf_counter()
        if done == total or now - last_report[0] >= PROGRESS_INTERVAL_SECONDS:
            last_report[0] = now
            report_progress(100 * done / total, f"{done} of {total} structures")

    def relax_as_asked(crystal: Structure) -> dict:
        options = request.relax
        return ml.relax(potential, crystal, optimizer=options.optimizer, fmax=options.fmax, steps=options.steps,
                        relax_cell=options.relax_cell)

    predicted = time.perf_counter()
    if request.property == "relax":
        results = []
        for index, crystal in enumerate(crystals):
            out = relax_as_asked(crystal)
            results.append({
                "energy": out["energy_per_atom"], "unit": "eV/atom",
                "total_energy": out["total_energy"], "total_energy_unit": "eV",
                "structure": out["structure"], "steps": out["steps"], "converged": out["converged"],
            })
            progress(index + 1, len(crystals))
    elif request.property == "formation_energy":
        # a formation energy is a ground-state quantity: relax the compound as its references were
        results = []
        for index, crystal in enumerate(crystals):
            relaxed = relax_as_asked(crystal)
            out = ml.formation_energy(potential, Structure.from_dict(relaxed["structure"]), request.model,
                                      ml.REFERENCE_CACHE)
            results.append({"formation_energy": out["formation_energy"], "unit": "eV/atom",
                            "energy": relaxed["energy_per_atom"], "energy_unit": "eV/atom",
                            "relaxed": {"steps": relaxed["steps"], "converged": relaxed["converged"]},
                            "references": out["references"]})
            progress(index + 1, len(crystals))
    else:
        with_forces = request.property in FORCE_PROPERTIES
        batch = request.batch_size or ml.DEFAULT_BATCH_SIZE["forces" if with_forces else "energy"]
        results = []
        for out in ml.predict(potential, crystals, forces=with_forces, stress=with_forces, batch_size=batch,
                              progress=progress):
            entry = {"energy": out["energy_per_atom"], "unit": "eV/atom",
                     "total_energy": out["total_energy"], "total_energy_unit": "eV"}
            if with_forces:
                entry.update(forces=out["forces"], forces_unit="eV/Å", stress=out["stress"], stress_unit="GPa")
            results.append(entry)
    for entry, note in zip(results, notes):
        entry.update(note)

    header = {
        "model": info.name,
        "model_version": info.version,
        "property": request.property,
        "timings": {"model_load_s": round(load_seconds, 4), "predict_s": round(time.perf_counter() - predicted, 4)},
    }
    if request.structure is not None:
        return {**results[0], **header}
    return {**header, "results": results}


JOB_TYPE = JobType(
    name="ml_predict",
    description="Energies, forces, stresses, relaxations and formation energies from a matgl model.",
    input_model=MLPredictInput,
    flow=ml_predict,
    requires=("matgl", "torch", "torch_geometric", "pymatgen", "ase"),
    check="kiln.tasks.ml.models:require_model",
)
