"""ml_predict through the real stack: matgl's own answers, warm models, batches, and clear refusals."""

from __future__ import annotations

import os

import pytest

from kiln.errors import InputInvalid, InvalidRequest
from tests.integration.support import MODEL_DIR

MODEL = "tensornet-matpes-pbe"


@pytest.fixture(scope="module")
def matgl_direct():
    """matgl 2.1.2 called directly, as a scientist would, for the answers kiln must equal."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import matgl
    from matgl.ext.ase import PESCalculator
    from pymatgen.io.ase import AseAtomsAdaptor

    potential = matgl.load_model(str(MODEL_DIR / "TensorNet-MatPES-PBE-v2025.1-PES"))
    calculator = PESCalculator(potential)

    def answer(structure):
        atoms = AseAtomsAdaptor.get_atoms(structure)
        atoms.calc = calculator
        return atoms.get_potential_energy(), atoms.get_forces()

    return answer


def rock_salt(a: float):
    from pymatgen.core import Lattice, Structure

    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def diamond_si(a: float):
    from pymatgen.core import Lattice, Structure

    return Structure.from_spacegroup("Fd-3m", Lattice.cubic(a), ["Si"], [[0, 0, 0]])


def test_the_models_endpoint_lists_the_shipped_model(http):
    models = {m["name"]: m for m in http.get("/api/v1/models").json()}
    assert MODEL in models
    assert models[MODEL]["units"]["energy"] == "eV/atom"
    assert "BSD-3-Clause" in models[MODEL]["licence"]


def test_energies_equal_matgl_called_directly(client, matgl_direct):
    import numpy as np

    crystals = [rock_salt(5.70), diamond_si(5.47), rock_salt(5.5)]
    rattled = rock_salt(5.6)
    rattled.perturb(0.1, min_distance=0.05)
    crystals.append(rattled)
    job = client.jobs.create(
        type="ml_predict", input={"model": MODEL, "structures": [c.as_dict() for c in crystals], "property": "forces"}
    ).wait(timeout=300)
    assert job.status.value == "completed", job.status_reason
    for crystal, result in zip(crystals, job.output["results"]):
        energy, forces = matgl_direct(crystal)
        assert result["total_energy"] == pytest.approx(energy, rel=1e-6)
        assert result["energy"] == pytest.approx(energy / len(crystal), rel=1e-6)
        assert result["unit"] == "eV/atom" and result["forces_unit"] == "eV/Å"
        np.testing.assert_allclose(result["forces"], forces, atol=1e-4)
        assert result["in_domain"] is True
    assert np.abs(job.output["results"][3]["forces"]).max() > 0.01
    assert job.output["results"][0]["energy"] == pytest.approx(-3.35765, abs=1e-4)
    assert job.output["results"][1]["energy"] == pytest.approx(-5.24389, abs=1e-4)
    assert job.output["model"] == MODEL and job.output["property"] == "forces" and job.output["model_version"]


def test_the_model_is_loaded_once_per_worker_process(client):
    first = client.jobs.create(type="ml_predict", input={"structure": diamond_si(5.47).as_dict()}).wait(timeout=300)
    second = client.jobs.create(type="ml_predict", input={"structure": diamond_si(5.43).as_dict()}).wait(timeout=300)
    assert first.status.value == second.status.value == "completed"
    assert second.output["timings"]["model_load_s"] == 0


def test_the_seed_call_with_a_formula_builds_and_relaxes_a_prototype(client):
    job = client.jobs.create(type="ml_predict", model=MODEL, input={"structure": "BaTiO3"}).wait(timeout=300)
    assert job.status.value == "completed", job.status_reason
    result = job.result
    assert result["unit"] == "eV/atom" and result["energy"] < -5
    assert "perovskite" in result["prototype"] and "relaxed" in result["prototype"]
    assert result["model"] == MODEL and result["property"] == "energy"
    assert "confidence" not in result


def test_many_structures_report_progress_as_they_go(client):
    crystals = [rock_salt(5.4 + 0.01 * i).as_dict() for i in range(40)]
    job = client.jobs.create(type="ml_predict", input={"structures": crystals, "batch_size": 8})
    events = list(client.jobs.events(job.id))
    progress = [e.data["percent"] for e in events if e.event == "progress"]
    # reports are at most one a second, and the last one always comes
    assert len(progress) >= 2 and progress == sorted(progress) and progress[-1] == 100.0
    assert len(client.jobs.get(job.id).output["results"]) == 40


def test_an_unknown_model_is_a_400_listing_the_models(client):
    with pytest.raises(InvalidRequest, match=MODEL):
        client.jobs.create(type="ml_predict", model="megnet-formation-energy", input={"structure": "NaCl"})


@pytest.mark.parametrize(
    "structure, words",
    [
        ("BaTiO", "not a formula with a known prototype"),
        ("Xx2O3", "Xx"),
        ("this is not a crystal", "structure"),
    ],
)
def test_bad_structures_are_a_422_naming_the_field(client, structure, words):
    with pytest.raises(InputInvalid) as caught:
        client.jobs.create(type="ml_predict", input={"structure": structure})
    assert caught.value.message.startswith("input.structure")
    assert words in caught.value.message


def test_overlapping_atoms_and_huge_cells_are_refused(client):
    from pymatgen.core import Lattice, Structure

    overlapping = Structure(Lattice.cubic(4), ["Na", "Cl"], [[0, 0, 0], [0.01, 0, 0]])
    with pytest.raises(InputInvalid, match="input.structures.1"):
        client.jobs.create(type="ml_predict", input={"structures": [rock_salt(5.6).as_dict(), overlapping.as_dict()]})
    huge = rock_salt(5.6)
    huge.make_supercell([12, 12, 9])
    with pytest.raises(InputInvalid, match="1000"):
        client.jobs.create(type="ml_predict", input={"structure": huge.as_dict()})


def test_a_large_input_travels_to_the_flow_by_reference(client):
    import httpx

    from tests.integration.support import SETTINGS

    crystals = [rock_salt(5.4 + 0.001 * i).as_dict() for i in range(120)]
    job = client.jobs.create(type="ml_predict", input={"structures": crystals}).wait(timeout=300)
    assert job.status.value == "completed", job.status_reason
    assert len(job.output["results"]) == 120
    parameters = httpx.get(f"{SETTINGS.prefect_api}/flow_runs/{job.flow_run_id}").json()["parameters"]
    assert list(parameters) == ["kiln_input"]
