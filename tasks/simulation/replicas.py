"""One replica of a simulation (relax, MD or single point), wherever it runs, and the merge of several."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from kiln.schemas.simulation import SimulationInput


def _no_progress(done: int, total: int) -> None:
    pass


def require_model(job_input: SimulationInput, settings) -> None:
    """At submission: a relax or md names a model this installation has (single points need none)."""
    if job_input.calculation != "single_point":
        from kiln.tasks.ml.models import require_model as require_ml_model

        require_ml_model(job_input, settings)


def _use_the_batch_jobs_cores() -> None:
    """On a batch node, torch uses the cores the batch job holds, not every core it sees.

    Two replicas sharing this 2-core machine each with torch's default of 2 threads took 2-5 s per
    force call of a 64-atom cell, against 0.16-0.3 s with one thread each.
    """
    import os

    cores = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("NCPUS")
    if cores and cores.isdigit():
        import torch

        torch.set_num_threads(int(cores))


def _crystal_atoms(request: SimulationInput):
    from pymatgen.io.ase import AseAtomsAdaptor

    from kiln.schemas.structures import parse_structure

    structure = parse_structure(request.structure).structure
    if request.supercell:
        structure = structure * request.supercell
    return AseAtomsAdaptor.get_atoms(structure)


def _potential(request: SimulationInput):
    from kiln.settings import get_settings
    from kiln.tasks.ml.models import load_potential

    return load_potential(request.model, get_settings().models_path)


def _final_structure(atoms) -> dict:
    from pymatgen.io.ase import AseAtomsAdaptor

    return AseAtomsAdaptor().get_structure(atoms.copy()).as_dict()


def run_replica(
    request: dict,
    replica: int = 1,
    trajectory_dir: str | None = None,
    *,
    task_id: int = 1,
    ntasks: int = 1,
    progress: Callable[[int, int], None] = _no_progress,
) -> dict[str, Any]:
    """Runs replica `replica` of the simulation `request` (a SimulationInput as a dict) and returns its results.

    Also the `simulation` callable of hpc_submit, so the same code runs locally and on a batch node.
    """
    simulation = SimulationInput.model_validate(request)
    _use_the_batch_jobs_cores()
    if simulation.calculation == "single_point":
        from kiln.tasks.simulation.molecules import single_point

        out = single_point(simulation.molecule, simulation.method, simulation.basis, simulation.charge,
                           simulation.multiplicity)
        progress(1, 1)
        return {"replica": replica, **out}
    folder = Path(trajectory_dir) if trajectory_dir else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    if simulation.calculation == "relax":
        return {"replica": replica, **relax(simulation, folder, progress)}
    return {"replica": replica, **molecular_dynamics(simulation, replica, folder, progress)}


def relax(simulation: SimulationInput, folder: Path | None, progress) -> dict[str, Any]:
    """Atoms (and cell) relaxed with an ASE optimizer on the matgl potential, the steps written as an ASE trajectory."""
    from ase.filters import FrechetCellFilter
    from matgl.ext.ase import OPTIMIZERS, PESCalculator

    started = time.perf_counter()
    potential = _potential(simulation)
    loaded = time.perf_counter()
    atoms = _crystal_atoms(simulation)
    atoms.calc = PESCalculator(potential, stress_unit="eV/A3")
    initial_energy = float(atoms.get_potential_energy())
    options = simulation.relax
    moving = FrechetCellFilter(atoms) if options.relax_cell else atoms
    path = folder / "relax.traj" if folder else None
    optimizer = OPTIMIZERS[options.optimizer.lower()].value(moving, logfile=None,
                                                             trajectory=str(path) if path else None)
    optimizer.attach(lambda: progress(optimizer.nsteps, options.steps), interval=5)
    converged = bool(optimizer.run(fmax=options.fmax, steps=options.steps))
    energy = float(atoms.get_potential_energy())
    progress(options.steps, options.steps)
    return {
        "energies": {
            "initial": initial_energy, "final": energy, "final_per_atom": energy / len(atoms), "unit": "eV",
        },
        "natoms": len(atoms),
        "steps": int(optimizer.nsteps),
        "converged": converged,
        "final_structure": _final_structure(atoms),
        "trajectory": {"path": str(path), "format": "ase-traj", "frames": int(optimizer.nsteps) + 1} if path else None,
        "timings": {"model_load_s": round(loaded - started, 3), "run_s": round(time.perf_counter() - loaded, 3)},
    }


def molecular_dynamics(simulation: SimulationInput, replica: int, folder: Path | None, progress) -> dict[str, Any]:
    """MD in the chosen ensemble on the matgl potential: sampled energies, their drift, and an extxyz trajectory."""
    import numpy as np
    from ase import units
    from ase.io import write
    from ase.md.langevin import Langevin
    from ase.md.nptberendsen import NPTBerendsen
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet
    from matgl.ext.ase import PESCalculator

    started = time.perf_counter()
    potential = _potential(simulation)
    loaded = time.perf_counter()
    options = simulation.md
    atoms = _crystal_atoms(simulation)
    atoms.calc = PESCalculator(potential, stress_unit="eV/A3")
    seed = options.seed + replica - 1
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=options.temperature_K, rng=rng)
    Stationary(atoms)
    timestep = options.timestep_fs * units.fs
    if options.ensemble == "NVE":
        dynamics = VelocityVerlet(atoms, timestep=timestep)
    elif options.ensemble == "NVT":
        dynamics = Langevin(atoms, timestep=timestep, temperature_K=options.temperature_K,
                            friction=options.friction_per_fs / units.fs, rng=rng)
    else:
        dynamics = NPTBerendsen(atoms, timestep=timestep, temperature_K=options.temperature_K,
                                pressure_au=options.pressure_GPa * units.GPa,
                                compressibility_au=4.57e-5 / units.bar)
    natoms = len(atoms)
    samples: dict[str, list[float]] = {"time_fs": [], "potential": [], "kinetic": [], "total": [],
                                       "temperature_K": [], "volume_A3": []}
    path = folder / f"replica-{replica}.extxyz" if folder else None
    frames = [0]

    def sample() -> None:
        epot = float(atoms.get_potential_energy())
        ekin = float(atoms.get_kinetic_energy())
        samples["time_fs"].append(round(dynamics.nsteps * options.timestep_fs, 6))
        samples["potential"].append(epot)
        samples["kinetic"].append(ekin)
        samples["total"].append(epot + ekin)
        samples["temperature_K"].append(float(atoms.get_temperature()))
        samples["volume_A3"].append(float(atoms.get_volume()))
        progress(dynamics.nsteps, options.steps)

    def frame() -> None:
        if path is not None:
            snapshot = atoms.copy()
            snapshot.info.update(replica=replica, step=dynamics.nsteps, time_fs=dynamics.nsteps * options.timestep_fs)
            write(str(path), snapshot, format="extxyz", append=frames[0] > 0)
            frames[0] += 1

    dynamics.attach(sample, interval=options.sample_interval)
    dynamics.attach(frame, interval=options.trajectory_interval)
    dynamics.run(options.steps)
    if dynamics.nsteps % options.sample_interval:
        sample()
    total = samples["total"]
    duration_ps = (samples["time_fs"][-1] - samples["time_fs"][0]) / 1000 or math.nan
    slope = _slope(samples["time_fs"], total) * 1000 if len(total) > 1 else 0.0  # eV/ps
    run_s = time.perf_counter() - loaded
    return {
        "ensemble": options.ensemble,
        "natoms": natoms,
        "steps": int(dynamics.nsteps),
        "seed": seed,
        "energies": {
            "unit": "eV",
            **samples,
            "final_potential": samples["potential"][-1],
            "final_total": total[-1],
        },
        "drift": {
            "total_energy_change_eV": total[-1] - total[0],
            "per_atom_per_ps_eV": slope / natoms,
            "duration_ps": duration_ps,
            "note": "linear fit of total energy over time; under a thermostat or barostat the total energy is "
            "not conserved, so this measures heat exchanged as well as integration error",
        },
        "mean_temperature_K": statistics.fmean(samples["temperature_K"]),
        "final_structure": _final_structure(atoms),
        "trajectory": {"path": str(path), "format": "extxyz", "frames": frames[0]} if path else None,
        "timings": {
            "model_load_s": round(loaded - started, 3),
            "run_s": round(run_s, 3),
            "ms_per_step": round(1000 * run_s / max(1, dynamics.nsteps), 3),
        },
    }


def _slope(x: list[float], y: list[float]) -> float:
    mean_x, mean_y = statistics.fmean(x), statistics.fmean(y)
    spread = sum((a - mean_x) ** 2 for a in x)
    return sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y)) / spread if spread else 0.0


def merge_replicas(outputs: list[dict[str, Any]], folder: Path | None) -> dict[str, Any]:
    """Mean and spread over replicas of their final energies, temperatures and drifts; trajectories in one file."""

    def spread(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values)}

    merged: dict[str, Any] = {"replicas": len(outputs), "unit": "eV"}
    if outputs and "drift" in outputs[0]:
        merged["final_potential"] = spread([o["energies"]["final_potential"] for o in outputs])
        merged["mean_potential"] = spread([statistics.fmean(o["energies"]["potential"]) for o in outputs])
        merged["final_total"] = spread([o["energies"]["final_total"] for o in outputs])
        merged["drift_per_atom_per_ps_eV"] = spread([o["drift"]["per_atom_per_ps_eV"] for o in outputs])
        merged["mean_temperature_K"] = spread([o["mean_temperature_K"] for o in outputs])
        paths = [o["trajectory"]["path"] for o in outputs if o.get("trajectory")]
        if folder is not None and paths:
            from ase.io import read, write

            target = folder / "trajectory.extxyz"
            frames = [atoms for path in paths for atoms in read(path, index=":", format="extxyz")]
            write(str(target), frames, format="extxyz")
            merged["trajectory"] = {"path": str(target), "format": "extxyz", "frames": len(frames),
                                    "note": "every replica's frames in order; each frame's info names its replica"}
    return merged
