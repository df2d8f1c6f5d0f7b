"""The steps of an `ml_predict` job as Prefect tasks: read, load the model, predict batch by batch, relax, references.

Each is a thin task over the pure functions of kiln.tasks.ml.predict, so the Prefect UI's run graph
shows what a job did and how long each step took; the numbers are those functions' own.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger

from kiln.schemas.ml_predict import MLPredictInput
from kiln.schemas.structures import ParsedStructure
from kiln.tasks.executor import executor
from kiln.tasks.ml import predict as ml
from kiln.tasks.ml.models import load_potential


@executor(name="read structures", task_run_name="read structures")
def read_structures(request: MLPredictInput) -> list[ParsedStructure]:
    """The input's structures read into pymatgen (once: validation may have read them already)."""
    parsed = request.parsed()
    get_run_logger().info(
        "read %d structure(s), %d atoms in all, %d of them given as a formula",
        len(parsed), sum(len(item.structure) for item in parsed), sum(item.prototype is not None for item in parsed),
    )
    return parsed


@executor(name="load model", task_run_name="load model {name}")
def load_model(name: str, model_dir: Path) -> tuple[Any, float]:
    """The matgl Potential, loaded once per worker process; with the seconds this call spent loading it (0 when warm)."""
    started = time.perf_counter()
    loads_before = load_potential.cache_info().misses
    potential = load_potential(name, model_dir)
    seconds = time.perf_counter() - started if load_potential.cache_info().misses > loads_before else 0.0
    if seconds:
        get_run_logger().info("loaded %s from %s in %.2f s", name, model_dir, seconds)
    else:
        get_run_logger().info("%s was already loaded in this worker process", name)
    return potential, seconds


@executor(name="relax prototype", task_run_name="relax prototype {formula}")
def relax_prototype(potential: Any, structure: Any, formula: str) -> dict:
    """A formula's prototype relaxed with the potential (a formula names a prototype, not a structure)."""
    return ml.relax(potential, structure, fmax=0.02, steps=500, relax_cell=True)


@executor(name="predict batch", task_run_name="predict batch {index} of {count}")
def predict_batch(potential: Any, structures: list, *, forces: bool, index: int, count: int) -> list[dict]:
    """One torch_geometric batch through the model: the same batch ml.predict would make at this offset."""
    started = time.perf_counter()
    out = ml.predict(potential, structures, forces=forces, stress=forces, batch_size=len(structures))
    get_run_logger().info(
        "batch %d of %d: %d structures in %.2f s", index, count, len(structures), time.perf_counter() - started
    )
    return out


@executor(name="relax", task_run_name="relax {index} of {count}")
def relax(potential: Any, structure: Any, options: Any, *, index: int, count: int) -> dict:
    """A structure relaxed as the job asked."""
    out = ml.relax(potential, structure, optimizer=options.optimizer, fmax=options.fmax, steps=options.steps,
                   relax_cell=options.relax_cell)
    get_run_logger().info(
        "relaxed %s in %d steps (%s)", structure.composition.reduced_formula, out["steps"],
        "converged" if out["converged"] else "not converged",
    )
    return out


@executor(name="formation references", task_run_name="formation references {elements}")
def formation_references(potential: Any, model: str, elements: list[str]) -> dict[str, dict]:
    """The elements' reference phases relaxed with the potential, computed once per model and process."""
    missing = [el for el in elements if (model, el) not in ml.REFERENCE_CACHE]
    references = {el: ml.reference_energy(potential, el, model, ml.REFERENCE_CACHE) for el in elements}
    get_run_logger().info(
        "references of %s: %s", ", ".join(elements),
        f"relaxed {', '.join(missing)} now" if missing else "all cached in this worker process",
    )
    return references


@executor(name="formation energy", task_run_name="formation energy {index} of {count}")
def formation_energy(potential: Any, structure: Any, model: str, *, index: int, count: int) -> dict:
    """The formation energy of a relaxed structure against its references."""
    return ml.formation_energy(potential, structure, model, ml.REFERENCE_CACHE)
