"""ml_predict against matgl itself, in one run: 1000 small structures, and one structure cold and warm.

Starts its own embedded kiln (one worker slot, the shipped TensorNet weights from ../shared/models).
  (a) 1000 small structures in one kiln job, energy only and again with forces and stress, timed from
      just before the POST to the job's completion seen by the SDK; beside them the same structures
      through matgl in this process, batched the same way (the Potential called on torch_geometric
      Batches of the same size), and matgl's per-structure ASE calculator for reference.
  (b) one structure: the first job on a fresh worker (model load included) and warm jobs after it.

    python bench/ml_predict.py [--structures 1000] [--warm-jobs 10]
"""

from __future__ import annotations

import argparse
import os
import random
import time

from common import REPO, embedded_stack, must_have_run, percentile

MODEL = "tensornet-matpes-pbe"
MODEL_DIR = REPO.parent / "shared" / "models"


def small_structures(count: int, seed: int = 11):
    """Rattled rock-salt, zinc-blende, fluorite, perovskite and elemental cells of 1–12 atoms."""
    from pymatgen.core import Lattice, Structure

    rng = random.Random(seed)
    # each prototype built once (pymatgen's space-group set-up takes ~0.2 s), at a = 1 Å scaled to 5 Å so its
    # primitive cell is found with pymatgen's length tolerances, and scaled into its lattice-constant range
    prototypes = [
        (Structure.from_spacegroup("Fm-3m", Lattice.cubic(5), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
         .get_primitive_structure(), (5.4, 5.9)),
        (Structure.from_spacegroup("F-43m", Lattice.cubic(5), ["Ga", "As"], [[0, 0, 0], [0.25, 0.25, 0.25]])
         .get_primitive_structure(), (5.5, 5.8)),
        (Structure.from_spacegroup("Fm-3m", Lattice.cubic(5), ["Ca", "F"], [[0, 0, 0], [0.25, 0.25, 0.25]])
         .get_primitive_structure(), (5.3, 5.6)),
        (Structure(Lattice.cubic(5), ["Ba", "Ti", "O", "O", "O"],
                   [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]), (3.9, 4.1)),
        (Structure.from_spacegroup("Fd-3m", Lattice.cubic(5), ["Si"], [[0, 0, 0]]), (5.4, 5.5)),
        (Structure.from_spacegroup("Fm-3m", Lattice.cubic(5), ["Cu"], [[0, 0, 0]]), (3.55, 3.7)),
    ]  # fmt: skip
    structures = []
    for _ in range(count):
        prototype, (low, high) = rng.choice(prototypes)
        crystal = prototype.copy()
        crystal.scale_lattice(prototype.volume * (rng.uniform(low, high) / 5) ** 3)
        crystal.perturb(0.05)
        structures.append(crystal)
    return structures


def matgl_batched(structures, forces: bool, batch_size: int) -> float:
    """Seconds for matgl itself: the Potential on Batches of `batch_size` graphs, in this process."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from kiln.tasks.ml.models import load_potential
    from kiln.tasks.ml.predict import predict

    potential = load_potential(MODEL, MODEL_DIR)
    predict(potential, structures[:batch_size], forces=forces, stress=forces, batch_size=batch_size)  # warm
    started = time.perf_counter()
    predict(potential, structures, forces=forces, stress=forces, batch_size=batch_size)
    return time.perf_counter() - started


def matgl_ase_loop(structures) -> float:
    """Seconds for matgl's ASE calculator, one structure at a time, energies only."""
    from matgl.ext.ase import PESCalculator
    from pymatgen.io.ase import AseAtomsAdaptor

    from kiln.tasks.ml.models import load_potential

    calculator = PESCalculator(load_potential(MODEL, MODEL_DIR))
    started = time.perf_counter()
    for crystal in structures:
        atoms = AseAtomsAdaptor.get_atoms(crystal)
        atoms.calc = calculator
        atoms.get_potential_energy()
    return time.perf_counter() - started


def kiln_job(client, payload: dict) -> tuple[float, dict]:
    started = time.perf_counter()
    # refresh: every timed job runs, none is answered from an earlier one's result
    job = client.jobs.create(type="ml_predict", input=payload, refresh=True).wait(timeout=1800)
    elapsed = time.perf_counter() - started
    must_have_run(job)
    return elapsed, job.output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=1000)
    parser.add_argument("--warm-jobs", type=int, default=10)
    args = parser.parse_args()

    structures = small_structures(args.structures)
    payload = [s.as_dict() for s in structures]
    env = {"KILN_MODEL_DIR": str(MODEL_DIR), "HF_HUB_OFFLINE": "1"}
    with embedded_stack(slots=1, env=env) as (settings, _, key):
        from kiln.sdk import Client
        from kiln.tasks.ml.predict import DEFAULT_BATCH_SIZE

        with Client(settings.api_url, key, timeout=600) as client:
            first, first_out = kiln_job(client, {"structure": payload[0]})
            warm = [kiln_job(client, {"structure": payload[i + 1]})[0] for i in range(args.warm_jobs)]
            energy_s, _ = kiln_job(client, {"structures": payload, "property": "energy"})
            forces_s, _ = kiln_job(client, {"structures": payload, "property": "stress"})

    energy_batch, forces_batch = DEFAULT_BATCH_SIZE["energy"], DEFAULT_BATCH_SIZE["forces"]
    direct_energy = matgl_batched(structures, False, energy_batch)
    direct_forces = matgl_batched(structures, True, forces_batch)
    ase_loop = matgl_ase_loop(structures)
    atoms = sum(len(s) for s in structures)

    print()
    print(f"ml_predict, {len(structures)} structures ({atoms} atoms), TensorNet-MatPES-PBE, 2-core machine, one slot")
    rows = [
        ("energy", energy_batch, energy_s, direct_energy),
        ("energy+forces+stress", forces_batch, forces_s, direct_forces),
    ]
    for name, batch, kiln_s, direct_s in rows:
        print(f"{name:<22} batch {batch:>3}: kiln job {kiln_s:7.2f} s ({len(structures) / kiln_s:6.1f}/s)  "
              f"matgl batched {direct_s:7.2f} s ({len(structures) / direct_s:6.1f}/s)  "
              f"ratio {kiln_s / direct_s:4.2f} (goal ≤ 1.25)")
    print(f"matgl ASE calculator, one structure at a time, energy: {ase_loop:7.2f} s "
          f"({len(structures) / ase_loop:6.1f}/s)")
    print(f"one structure, submit → completed: first job {first:.2f} s "
          f"(model load {first_out['timings']['model_load_s']:.2f} s in the worker), "
          f"warm p50 {percentile(warm, 50):.3f} s, p95 {percentile(warm, 95):.3f} s over {len(warm)} jobs")


if __name__ == "__main__":
    main()
