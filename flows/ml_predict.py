"""The `ml_predict` job: energies, forces, stresses, relaxations and formation energies from a matgl model."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prefect import flow, get_run_logger

from kiln.runtime import report_progress
from kiln.schemas.job_types import JobType
from kiln.schemas.ml_predict import MLPredictInput
from kiln.settings import get_settings

FORCE_PROPERTIES = ("forces", "stress")
PROGRESS_INTERVAL_SECONDS = 1.0


@flow(name="ml_predict", persist_result=True, result_serializer="json")
async def ml_predict(input: MLPredictInput) -> dict:
    # An async flow whose work runs in a thread: Prefect's synchronous engine joins its heartbeat
    # thread at the end of every run, about 1 s per job here (measured in bench/ml_predict.py).
    return await asyncio.to_thread(predict_job, input)


def predict_job(request: MLPredictInput) -> dict:
    from prefect.context import SyncClientContext
    from pymatgen.core import Structure

    from kiln.schemas.structures import domain_report
    from kiln.tasks.ml import executors as steps
    from kiln.tasks.ml import predict as ml
    from kiln.tasks.ml.models import MODELS

    logger = get_run_logger()
    # one client for every step of this thread; without it each task run opens its own
    with SyncClientContext.get_or_create():
        steps.read_structures(request)
        info = MODELS[request.model]
        potential, load_seconds = steps.load_model(request.model, get_settings().models_path)

        crystals: list[Structure] = []
        notes: list[dict] = []
        for item in request.parsed():
            crystal = item.structure
            note: dict[str, Any] = {}
            if item.prototype:
                relaxed = steps.relax_prototype(potential, crystal, crystal.composition.reduced_formula)
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

        predicted = time.perf_counter()
        count = len(crystals)
        if request.property == "relax":
            results = []
            for index, crystal in enumerate(crystals):
                out = steps.relax(potential, crystal, request.relax, index=index + 1, count=count)
                results.append({
                    "energy": out["energy_per_atom"], "unit": "eV/atom",
                    "total_energy": out["total_energy"], "total_energy_unit": "eV",
                    "structure": out["structure"], "steps": out["steps"], "converged": out["converged"],
                })
                progress(index + 1, count)
        elif request.property == "formation_energy":
            # a formation energy is a ground-state quantity: relax the compound as its references were
            elements = sorted({el.symbol for crystal in crystals for el in crystal.composition.elements})
            steps.formation_references(potential, request.model, elements)
            results = []
            for index, crystal in enumerate(crystals):
                relaxed = steps.relax(potential, crystal, request.relax, index=index + 1, count=count)
                out = steps.formation_energy(potential, Structure.from_dict(relaxed["structure"]), request.model,
                                             index=index + 1, count=count)
                results.append({"formation_energy": out["formation_energy"], "unit": "eV/atom",
                                "energy": relaxed["energy_per_atom"], "energy_unit": "eV/atom",
                                "relaxed": {"steps": relaxed["steps"], "converged": relaxed["converged"]},
                                "references": out["references"]})
                progress(index + 1, count)
        else:
            with_forces = request.property in FORCE_PROPERTIES
            batch = request.batch_size or ml.DEFAULT_BATCH_SIZE["forces" if with_forces else "energy"]
            # checked over the whole list first, so that a refusal names the structure's index in the job
            ml.check_elements(potential, crystals)
            batches = [crystals[start : start + batch] for start in range(0, count, batch)]
            results = []
            for index, chunk in enumerate(batches):
                for out in steps.predict_batch(potential, chunk, forces=with_forces, index=index + 1,
                                               count=len(batches)):
                    entry = {"energy": out["energy_per_atom"], "unit": "eV/atom",
                             "total_energy": out["total_energy"], "total_energy_unit": "eV"}
                    if with_forces:
                        entry.update(forces=out["forces"], forces_unit="eV/Å", stress=out["stress"],
                                     stress_unit="GPa")
                    results.append(entry)
                progress(len(results), count)
        for entry, note in zip(results, notes):
            entry.update(note)
        predict_seconds = time.perf_counter() - predicted
        logger.info("%s of %d structure(s) with %s in %.2f s", request.property, count, info.name, predict_seconds)

    header = {
        "model": info.name,
        "model_version": info.version,
        "property": request.property,
        "timings": {"model_load_s": round(load_seconds, 4), "predict_s": round(predict_seconds, 4)},
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
    versions="kiln.tasks.ml.models:model_version",
)
