"""The simulation job's input, molecules, cost, and a few real steps of each calculation (no servers)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from kiln.schemas.simulation import LOCAL_COST_LIMIT, SimulationInput
from kiln.schemas.molecules import MoleculeError, parse_molecule
from kiln.tasks.simulation.replicas import merge_replicas, run_replica

MODEL_DIR = Path(__file__).resolve().parents[3] / "shared" / "models"


@pytest.fixture(autouse=True)
def _models(monkeypatch):
    monkeypatch.setenv("KILN_MODEL_DIR", str(MODEL_DIR))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from kiln.settings import get_settings

    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_molecules_in_every_form():
    assert parse_molecule("H2O").get_chemical_formula() == "H2O"
    xyz = "3\nwater\nO 0 0 0.119\nH 0 0.763 -0.477\nH 0 -0.763 -0.477"
    atoms = parse_molecule(xyz)
    assert atoms.get_chemical_formula() == "H2O" and not atoms.pbc.any()
    assert len(parse_molecule({"symbols": ["H", "H"], "positions": [[0, 0, 0], [0, 0, 0.74]]})) == 2
    ethanol = parse_molecule("CCO")  # SMILES: RDKit embeds a conformer with a fixed seed
    assert ethanol.get_chemical_formula() == "C2H6O" and (ethanol.positions == parse_molecule("CCO").positions).all()
    with pytest.raises(MoleculeError, match="not a SMILES RDKit can read"):
        parse_molecule("C1CC(")


def test_input_rules_name_the_field():
    with pytest.raises(ValidationError, match="takes `molecule`"):
        SimulationInput(calculation="single_point", structure="Si")
    with pytest.raises(ValidationError, match="ntasks"):
        SimulationInput(calculation="relax", structure="Si", ntasks=3)
    with pytest.raises(ValidationError, match="supercell"):
        SimulationInput(calculation="md", structure="Si", supercell=(6, 6, 6))


def test_cost_is_atom_steps():
    md = SimulationInput(calculation="md", structure="Si", supercell=(2, 2, 2), ntasks=3, md={"steps": 100})
    assert md.cost() == 64 * 100 * 3
    assert SimulationInput(calculation="relax", structure="Si", relax={"steps": 50}).cost() == 8 * 50
    assert SimulationInput(calculation="single_point", molecule="H2O").cost() == 3
    assert LOCAL_COST_LIMIT > md.cost()


@pytest.mark.parametrize("ensemble", ["NVE", "NVT", "NPT"])
def test_md_in_each_ensemble_records_energies_and_a_trajectory(tmp_path, ensemble):
    done = []
    out = run_replica({"calculation": "md", "structure": "Si",
                       "md": {"ensemble": ensemble, "steps": 6, "sample_interval": 2, "trajectory_interval": 3}},
                      2, str(tmp_path), progress=lambda d, t: done.append((d, t)))
    assert out["replica"] == 2 and out["seed"] == 1 and out["steps"] == 6
    assert len(out["energies"]["total"]) == 4  # steps 0, 2, 4, 6
    assert out["trajectory"]["frames"] == 3 and os.path.exists(out["trajectory"]["path"])
    assert done[-1] == (6, 6)
    if ensemble == "NPT":
        assert out["energies"]["volume_A3"][-1] != out["energies"]["volume_A3"][0]
    merged = merge_replicas([out, out], tmp_path)
    assert merged["replicas"] == 2 and merged["final_total"]["std"] == 0
    assert merged["trajectory"]["frames"] == 6


def test_relax_writes_its_steps(tmp_path):
    out = run_replica({"calculation": "relax", "structure": "NaCl", "relax": {"fmax": 0.05}}, 1, str(tmp_path))
    assert out["converged"] and out["energies"]["unit"] == "eV"
    assert out["trajectory"]["frames"] == out["steps"] + 1 and os.path.exists(out["trajectory"]["path"])
