"""simulation jobs run locally: MD of a 64-atom cell with its energy drift, a relaxation, water single points."""

from __future__ import annotations

import os

import pytest

from tests.integration.support import JOB_TYPE_TESTS, SETTINGS, wait_until

pytestmark = JOB_TYPE_TESTS


def run(http, input: dict, timeout: float = 300, **extra) -> dict:
    created = http.post("/api/v1/jobs", json={"type": "simulation", "input": input, **extra})
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    done = wait_until(
        lambda: (j := http.get(f"/api/v1/jobs/{job_id}").json())["status"] in ("completed", "failed", "cancelled")
        and j,
        timeout=timeout, interval=0.5, what=f"simulation {job_id}",
    )
    assert done["status"] == "completed", done["status_reason"]
    return done


def test_md_of_a_64_atom_cell_reports_its_energy_drift(http, idle):
    done = run(http, {"calculation": "md", "structure": "Si", "supercell": [2, 2, 2],
                      "md": {"ensemble": "NVE", "steps": 40, "temperature_K": 300, "timestep_fs": 1.0,
                             "sample_interval": 5, "trajectory_interval": 10}})
    out = done["output"]
    assert out["where"] == "local" and out["natoms"] == 64 and out["steps"] == 40
    energies = out["energies"]
    assert energies["unit"] == "eV" and len(energies["total"]) == 9  # steps 0, 5, …, 40
    # diamond Si near -5.24 eV/atom with this potential (shared/models/README.md)
    assert -5.4 < energies["final_potential"] / 64 < -5.0
    drift = out["drift"]
    assert drift["total_energy_change_eV"] == pytest.approx(energies["total"][-1] - energies["total"][0])
    # velocity Verlet at 1 fs conserves the total energy to well under a meV/atom over 40 fs
    assert abs(drift["total_energy_change_eV"]) / 64 < 1e-3
    trajectory = out["trajectory"]
    assert trajectory["frames"] == 5 and trajectory["format"] == "extxyz"
    assert os.path.exists(SETTINGS.results_dir / trajectory["storage_key"])
    assert len(out["final_structure"]["sites"]) == 64
    assert out["timings"]["ms_per_step"] > 0


def test_relax_lowers_the_energy_and_returns_the_final_structure(http, idle):
    done = run(http, {"calculation": "relax", "structure": "NaCl", "relax": {"fmax": 0.02}})
    out = done["output"]
    assert out["converged"] is True
    assert out["energies"]["final"] <= out["energies"]["initial"] + 1e-6
    # rock salt near -3.36 eV/atom with this potential (shared/models/README.md)
    assert out["energies"]["final_per_atom"] == pytest.approx(-3.36, abs=0.05)
    assert os.path.exists(SETTINGS.results_dir / out["trajectory"]["storage_key"])


def test_water_single_points_agree_with_the_libraries_called_directly(http, idle):
    from ase.build import molecule
    from ase.units import Bohr
    from pyscf import dft, gto
    from tblite.interface import Calculator

    water = molecule("H2O")
    xyz = "3\nwater\n" + "\n".join(f"{s} {x:.8f} {y:.8f} {z:.8f}" for s, (x, y, z)
                                     in zip(water.get_chemical_symbols(), water.positions))
    xtb = run(http, {"calculation": "single_point", "molecule": xyz, "method": "GFN2-xTB"})["output"]
    direct_xtb = Calculator("GFN2-xTB", water.numbers, water.positions / Bohr)
    direct_xtb.set("verbosity", 0)
    assert xtb["energy_unit"] == "Hartree"
    assert xtb["energy"] == pytest.approx(float(direct_xtb.singlepoint().get("energy")), abs=1e-7)

    pbe = run(http, {"calculation": "single_point", "molecule": "H2O", "method": "PBE", "basis": "def2-SVP"})["output"]
    mol = gto.M(atom=[(s, tuple(p)) for s, p in zip(water.get_chemical_symbols(), water.positions)],
                basis="def2-svp", verbose=0)
    mf = dft.RKS(mol)
    mf.xc = "PBE"
    assert pbe["energy"] == pytest.approx(mf.kernel(), abs=1e-6)
    assert pbe["basis_functions"] == 24 and pbe["converged"] is True


def test_bad_simulation_input_is_refused_naming_the_field(http):
    no_structure = http.post("/api/v1/jobs", json={"type": "simulation", "input": {"calculation": "md"}})
    assert no_structure.status_code == 422 and "structure" in no_structure.json()["detail"]
    bad_molecule = http.post("/api/v1/jobs", json={
        "type": "simulation", "input": {"calculation": "single_point", "molecule": "C1CC("}})
    assert bad_molecule.status_code == 422
    assert "input.molecule" in bad_molecule.json()["detail"] and "SMILES" in bad_molecule.json()["detail"]
    replicas_of_relax = http.post("/api/v1/jobs", json={
        "type": "simulation", "input": {"calculation": "relax", "structure": "Si", "ntasks": 2}})
    assert replicas_of_relax.status_code == 422 and "ntasks" in replicas_of_relax.json()["detail"]
    bad_ensemble = http.post("/api/v1/jobs", json={
        "type": "simulation", "input": {"calculation": "md", "structure": "Si", "md": {"ensemble": "NVX"}}})
    assert bad_ensemble.status_code == 422 and "input.md.ensemble" in bad_ensemble.json()["detail"]


def test_a_single_point_of_a_molecule_given_as_smiles(http, idle):
    """The Atomiverse batch document's molecules: `Atoms.from_smiles("CCO")`, here RDKit's conformer (fixed seed)."""
    from ase.units import Bohr
    from tblite.interface import Calculator

    from kiln.schemas.molecules import molecule_from_smiles

    out = run(http, {"calculation": "single_point", "molecule": "CCO", "method": "GFN2-xTB"})["output"]
    ethanol = molecule_from_smiles("CCO")
    direct = Calculator("GFN2-xTB", ethanol.numbers, ethanol.positions / Bohr)
    direct.set("verbosity", 0)
    assert out["energy"] == pytest.approx(float(direct.singlepoint().get("energy")), abs=1e-7)
