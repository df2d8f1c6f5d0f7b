"""dataset_process's steps on dcdft: a broken row of each kind ends in the errors table with its step; policies."""

from __future__ import annotations

import json
import warnings

import pytest
from pydantic import ValidationError

from kiln.schemas.dataset_process import DatasetProcessInput
from kiln.tasks.dataset.formats import Entry
from kiln.tasks.dataset.steps import PipelineFailed, finish, run_partition

pytest.importorskip("matminer")
warnings.filterwarnings("ignore")


def dcdft_entries(names=None) -> list[Entry]:
    from ase.collections import dcdft
    from pymatgen.io.ase import AseAtomsAdaptor

    return [Entry(name, "pymatgen", json.dumps(AseAtomsAdaptor.get_structure(dcdft[name]).as_dict()),
                  {"exp_volume": dcdft.data[name].get("exp_volume")}) for name in names or dcdft.names]  # fmt: skip


def broken_entries() -> list[Entry]:
    """An unparseable entry, two overlapping atoms, and a value outside the schema's range."""
    from ase.collections import dcdft
    from pymatgen.io.ase import AseAtomsAdaptor

    overlapping = AseAtomsAdaptor.get_structure(dcdft["Si"])
    overlapping.append("Si", overlapping[0].coords + 0.1, coords_are_cartesian=True)
    cu = AseAtomsAdaptor.get_structure(dcdft["Cu"])
    return [Entry("unparseable", "cif", "data_x\n_cell_length_a 3\nloop_\n"),
            Entry("overlapping", "pymatgen", json.dumps(overlapping.as_dict()), {"exp_volume": 20.0}),
            Entry("out-of-range", "pymatgen", json.dumps(cu.as_dict()), {"exp_volume": -1.0})]  # fmt: skip


def pipeline(**validate) -> DatasetProcessInput:
    return DatasetProcessInput.model_validate({"source": {"file": "d.json"}, "steps": [
        {"step": "filter", "elements_exclude": ["He", "Ne", "Ar", "Kr", "Xe", "Rn"]},
        {"step": "featurize", "featurizers": [{"name": "ElementProperty", "preset": "magpie"},
                                              {"name": "DensityFeatures"}]},
        {"step": "validate", "schema": {"columns": {"exp_volume": {"checks": {"gt": 0}, "nullable": True},
                                                    "density": {"checks": {"in_range": {"min_value": 0, "max_value": 30}}}}},
         **validate},
    ]})  # fmt: skip


def test_a_broken_row_of_each_kind_ends_in_the_errors_table_with_its_step():
    entries = dcdft_entries(["Si", "Cu", "Fe", "NaCl" if False else "Na", "He", "O"]) + broken_entries()
    request = pipeline()
    result = finish([run_partition(entries[:4], request), run_partition(entries[4:], request)], request)
    errors = {e["row_id"]: e for e in result.errors}
    assert set(errors) == {"unparseable", "overlapping", "out-of-range"}
    assert errors["unparseable"]["step"] == "read" and errors["unparseable"]["step_index"] is None
    assert errors["overlapping"]["step"] == "validate" and errors["overlapping"]["error_type"] == "OverlappingAtoms"
    assert errors["out-of-range"]["step_index"] == 2 and errors["out-of-range"]["error_type"] == "SchemaError"
    assert "exp_volume" in errors["out-of-range"]["message"] and "-1.0" in errors["out-of-range"]["message"]
    counts = {c.step_index: c.as_dict() for c in result.counts}
    assert counts[None] == {**counts[None], "in": 9, "out": 8, "failed": 1}
    assert counts[0] == {**counts[0], "in": 8, "out": 7, "filtered": 1, "failed": 0}  # He filtered, not an error
    assert counts[2] == {**counts[2], "in": 7, "out": 5, "failed": 2}
    assert sorted(row.row_id for row in result.rows) == ["Cu", "Fe", "Na", "O", "Si"]
    assert all("MagpieData mean Number" in row.properties and "density" in row.properties for row in result.rows)
    # validate's default policy keeps the failed rows, with their error, for the quarantine table
    assert sorted(row.row_id for row, _ in result.quarantined) == ["out-of-range", "overlapping"]


def test_features_equal_matminer_s_own_featurize_dataframe():
    import pandas as pd
    from matminer.featurizers.composition import ElementProperty
    from matminer.featurizers.structure import DensityFeatures
    from pymatgen.core import Structure

    entries = dcdft_entries(["Si", "Cu", "Fe", "O"])
    result = run_partition(entries, pipeline())
    frame = pd.DataFrame({"structure": [Structure.from_dict(json.loads(e.raw)) for e in entries]})
    frame["composition"] = [s.composition for s in frame["structure"]]
    frame = ElementProperty.from_preset("magpie").featurize_dataframe(frame, "composition", pbar=False)
    frame = DensityFeatures().featurize_dataframe(frame, "structure", pbar=False)
    for row, (_, theirs) in zip(result.rows, frame.iterrows()):
        for label in ("MagpieData mean Number", "MagpieData avg_dev Electronegativity", "density", "vpa"):
            assert row.properties[label] == pytest.approx(theirs[label], nan_ok=True)


def test_a_featurizer_failing_on_a_row_is_that_row_s_error_never_a_nan():
    request = DatasetProcessInput.model_validate({"source": {"file": "d"}, "steps": [
        {"step": "featurize", "featurizers": [{"name": "DensityFeatures"}]}]})  # fmt: skip
    result = run_partition(dcdft_entries(["He", "Si"]), request)
    assert [row.row_id for row in result.rows] == ["Si"]
    (error,) = result.errors
    assert error["row_id"] == "He" and error["step"] == "featurize" and error["message"].startswith("DensityFeatures:")


def test_policy_fail_stops_at_the_first_failing_row_naming_it():
    import pickle

    with pytest.raises(PipelineFailed, match=r"row 'overlapping' failed steps.2 \(validate\)") as failed:
        run_partition(broken_entries()[1:], pipeline(policy="fail"))
    # it crosses from a Dask process to the flow's whole
    again = pickle.loads(pickle.dumps(failed.value))
    assert again.error == failed.value.error and str(again) == str(failed.value)


def test_policy_drop_keeps_no_quarantine():
    result = run_partition(broken_entries()[1:], pipeline(policy="drop"))
    assert result.quarantined == [] and len(result.errors) == 2


def test_unique_columns_are_checked_over_every_partition():
    request = DatasetProcessInput.model_validate({"source": {"file": "d"}, "steps": [
        {"step": "validate", "min_distance": None, "schema": {"columns": {"tag": {"dtype": "str", "unique": True}}},
         "policy": "drop"}]})  # fmt: skip
    first, second = dcdft_entries(["Si", "Cu"]), dcdft_entries(["Fe", "Na"])
    for entry, tag in zip(first + second, ["a", "b", "c", "a"]):
        entry.properties = {"tag": tag}
    result = finish([run_partition(first, request), run_partition(second, request)], request)
    assert [row.row_id for row in result.rows] == ["Si", "Cu", "Fe"]
    (error,) = result.errors
    assert error["row_id"] == "Na" and "first in row 'Si'" in error["message"]
    assert result.counts[1].as_dict() | {"seconds": 0} == {"step": "validate", "step_index": 0, "in": 4, "out": 3,
                                                           "failed": 1, "filtered": 0, "seconds": 0}  # fmt: skip


def test_filters_and_duplicates():
    request = DatasetProcessInput.model_validate({"source": {"file": "d"}, "steps": [
        {"step": "filter", "volume_per_atom": {"max": 22}, "formula": "C|Si|Ge|Cu", "duplicates": True}]})  # fmt: skip
    entries = dcdft_entries(["Si", "Ge", "Cu", "C", "Na"]) + dcdft_entries(["Si"])
    entries[-1].row_id = "Si-again"
    result = run_partition(entries, request)
    assert [row.row_id for row in result.rows] == ["Si", "Cu", "C"]  # Ge's volume per atom is above 22 Å³
    assert result.counts[1].filtered == 3 and result.errors == []


def test_charge_balance_where_oxidation_states_are_guessable():
    from pymatgen.core import Lattice, Structure

    def entry(row_id, species, coords):
        return Entry(row_id, "pymatgen", json.dumps(Structure(Lattice.cubic(4.2), species, coords).as_dict()))

    rock_salt = [[0, 0, 0], [0.5, 0.5, 0.5]]
    request = DatasetProcessInput.model_validate({"source": {"file": "d"}, "steps": [
        {"step": "validate", "charge_balance": True, "policy": "drop"}]})  # fmt: skip
    result = run_partition([entry("MgO", ["Mg", "O"], rock_salt), entry("NaO", ["Na", "O"], rock_salt),
                            entry("FeNi", ["Fe", "Ni"], rock_salt)], request)  # fmt: skip
    assert [row.row_id for row in result.rows] == ["MgO", "FeNi"]
    assert result.errors[0]["row_id"] == "NaO" and result.errors[0]["error_type"] == "ChargeImbalance"


def test_the_input_names_the_field_that_is_wrong():
    with pytest.raises(ValidationError) as refused:
        DatasetProcessInput.model_validate({"source": {"file": "d"}, "steps": [
            {"step": "featurize", "featurizers": [{"name": "ElementProperty", "preset": "magpie"}, {"name": "Foo"}]}]})
    assert refused.value.errors()[0]["loc"][:5] == ("steps", 0, "featurize", "featurizers", 1)
    with pytest.raises(ValidationError, match="unknown pandera check 'greater'"):
        DatasetProcessInput.model_validate({"source": {"file": "d"}, "steps": [
            {"step": "validate", "schema": {"columns": {"x": {"checks": {"greater": 1}}}}}]})
    with pytest.raises(ValidationError, match="no preset 'nope'"):
        DatasetProcessInput.model_validate({"source": {"file": "d"}, "steps": [
            {"step": "featurize", "featurizers": [{"name": "ElementProperty", "preset": "nope"}]}]})
    with pytest.raises(ValidationError, match="name the dataset"):
        DatasetProcessInput.model_validate({"source": {}})
    assert DatasetProcessInput.model_validate({"source": {"file": "a.cif"}}).source.files == ["a.cif"]


def test_ml_energy_is_ml_predict_s_energy_through_the_warm_model():
    from pathlib import Path

    from pymatgen.core import Structure

    from kiln.tasks.ml.models import load_potential
    from kiln.tasks.ml.predict import predict

    models = [Path(__file__).resolve().parents[3] / "shared" / "models"]
    request = DatasetProcessInput.model_validate({"source": {"file": "d"}, "steps": [
        {"step": "featurize", "featurizers": [{"name": "ml_energy"}]}]})  # fmt: skip
    entries = dcdft_entries(["Si", "Cu", "Po"])
    result = run_partition(entries, request, models_path=models)
    potential = load_potential("tensornet-matpes-pbe", models)
    assert [row.row_id for row in result.rows] == ["Si", "Cu"]  # TensorNet-MatPES has no Po
    direct = predict(potential, [Structure.from_dict(json.loads(e.raw)) for e in entries[:2]])
    for row, out in zip(result.rows, direct):
        assert row.properties["ml_energy"] == pytest.approx(out["energy_per_atom"], rel=1e-6)
    (error,) = result.errors
    assert error["row_id"] == "Po" and error["error_type"] == "OutOfDomain" and "Po" in error["message"]


def test_duplicates_are_found_across_partitions_too():
    request = DatasetProcessInput.model_validate({"source": {"file": "d"}, "steps": [
        {"step": "filter", "duplicates": True}, {"step": "validate"}]})  # fmt: skip
    first, second = dcdft_entries(["Si", "Cu"]), dcdft_entries(["Fe", "Si"])
    second[1].row_id = "Si-again"
    result = finish([run_partition(first, request), run_partition(second, request)], request)
    assert [row.row_id for row in result.rows] == ["Si", "Cu", "Fe"]
    counts = [c.as_dict() for c in result.counts]
    assert (counts[1]["in"], counts[1]["out"], counts[1]["filtered"]) == (4, 3, 1)
    assert (counts[2]["in"], counts[2]["out"]) == (3, 3)
