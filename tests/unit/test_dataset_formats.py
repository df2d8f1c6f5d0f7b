"""dataset_process's formats: every writer's output read back by every reader, structures kept to 1e-8 Å."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

from kiln.tasks.dataset.formats import (
    OUTPUT_SUFFIX,
    Entry,
    EntryError,
    Row,
    detect_format,
    parse_entry,
    read_dataset,
    split_text,
    write_dataset,
)

pytest.importorskip("pyarrow")
warnings.filterwarnings("ignore")

WRITTEN = ["parquet", "json", "extxyz", "cif-zip", "poscar-zip", "ase-db"]


def dataset() -> list[Row]:
    """dcdft crystals, perturbed off their special positions, and pymatgen's test structures with oxidation states,
    charges and site properties of every shape."""
    from ase.collections import dcdft
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.util.testing import PymatgenTest

    rng = np.random.default_rng(7)
    rows = []
    for name in ["Si", "Fe", "O", "Zn", "Mn", "Ga"]:
        structure = AseAtomsAdaptor.get_structure(dcdft[name])
        for index, shift in enumerate(rng.normal(0, 0.01, (len(structure), 3))):
            structure.translate_sites([index], shift, frac_coords=False, to_unit_cell=False)
        rows.append(Row(f"dcdft-{name}", structure, {"exp_volume": dcdft.data[name].get("exp_volume"), "flag": "T"}))
    for name in ["LiFePO4", "SrTiO3", "CsCl", "TiO2"]:
        structure = PymatgenTest.get_structure(name)
        structure.perturb(0.02, 0.0)
        structure.add_oxidation_state_by_guess()
        structure.add_site_property("charge", list(rng.normal(0, 1, len(structure))))
        structure.add_site_property("magmom", rng.normal(0, 1, (len(structure), 3)).tolist())
        structure.add_site_property("selective_dynamics", [[True, False, True]] * len(structure))
        rows.append(Row(name, structure, {"n": 3, "ok": True, "e": -1.2345678901234567}))
    return rows


def coordinate_error(a, b) -> float:
    """Largest difference of the cell vectors and of the Cartesian positions (Å), atom by atom in order."""
    cell = np.abs(a.lattice.matrix - b.lattice.matrix).max()
    positions = np.linalg.norm((a.frac_coords - b.frac_coords) @ a.lattice.matrix, axis=1).max()
    return float(max(cell, positions))


def assert_same(before: Row, after: Row) -> None:
    assert after.row_id == before.row_id
    assert coordinate_error(before.structure, after.structure) <= 1e-8
    assert [str(site.specie) for site in after.structure] == [str(site.specie) for site in before.structure]
    assert after.structure.site_properties.keys() == before.structure.site_properties.keys()
    for name, values in before.structure.site_properties.items():
        np.testing.assert_array_equal(np.array(after.structure.site_properties[name]), np.array(values), err_msg=name)
    # a table has every column in every row: a property another row has is null here
    assert {k: v for k, v in after.properties.items() if v is not None} == {
        k: v for k, v in before.properties.items() if v is not None}


@pytest.fixture(scope="module")
def rows():
    return dataset()


@pytest.mark.parametrize("first,second", list(itertools.product(WRITTEN, WRITTEN)))
def test_every_format_pair_round_trips(tmp_path, rows, first, second):
    once = read_dataset(write_dataset(rows, first, tmp_path / f"a{OUTPUT_SUFFIX[first]}"))
    twice = read_dataset(write_dataset(once, second, tmp_path / f"b{OUTPUT_SUFFIX[second]}"))
    assert len(twice) == len(rows)
    for before, after in zip(rows, twice):
        assert_same(before, after)
        from pymatgen.analysis.structure_matcher import StructureMatcher

        assert StructureMatcher().fit(before.structure, after.structure)


def test_extxyz_keeps_full_precision_where_ase_writes_8_decimals(tmp_path, rows):
    import ase.io

    from kiln.tasks.dataset.formats import structure_to_atoms

    ours = read_dataset(write_dataset(rows, "extxyz", tmp_path / "ours.extxyz"))
    ase.io.write(tmp_path / "ase.extxyz", [structure_to_atoms(r.structure) for r in rows], format="extxyz")
    theirs = ase.io.read(tmp_path / "ase.extxyz", index=":")
    ase_error = max(np.abs(t.positions - r.structure.cart_coords).max() for t, r in zip(theirs, rows))
    assert ase_error > 1e-10  # 8 decimals: what kiln's writer avoids
    assert max(coordinate_error(r.structure, o.structure) for r, o in zip(rows, ours)) < 1e-12


def test_foreign_files_are_read(tmp_path):
    """Files kiln did not write: ASE's extxyz with its calculator results, pymatgen's CIF and POSCAR."""
    import ase.io
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator
    from pymatgen.io.cif import CifWriter
    from pymatgen.io.vasp import Poscar
    from pymatgen.util.testing import PymatgenTest

    atoms = bulk("Cu", cubic=True)
    atoms.calc = SinglePointCalculator(atoms, energy=-14.5, forces=np.zeros((4, 3)))
    atoms.info["source"] = "mp-30"
    ase.io.write(tmp_path / "cu.xyz", atoms, format="extxyz")
    (row,) = read_dataset(tmp_path / "cu.xyz")
    assert row.properties == {"source": "mp-30", "energy": -14.5} and "forces" in row.structure.site_properties
    structure = PymatgenTest.get_structure("LiFePO4")
    (tmp_path / "LiFePO4.cif").write_text(str(CifWriter(structure)))
    (tmp_path / "POSCAR").write_text(Poscar(structure).get_str())
    for name in ("LiFePO4.cif", "POSCAR"):
        (read,) = read_dataset(tmp_path / name)
        assert read.row_id == name and read.structure.composition == structure.composition


def test_formats_are_told_by_name_then_content():
    assert detect_format("x.cif", b"") == "cif"
    assert detect_format("POSCAR_12", b"") == "poscar"
    assert detect_format("data", b"PAR1....") == "parquet"
    assert detect_format("data", b"SQLite format 3\x00") == "ase-db"
    assert detect_format("data", b"# made by hand\ndata_NaCl\n_cell_length_a 5.6") == "cif"
    assert detect_format("data", b"2\nLattice=\"...\"\nNa 0 0 0") == "extxyz"
    assert detect_format("data", b'[{"structure": {}}]') == "json"
    with pytest.raises(EntryError, match="cannot tell"):
        detect_format("data", b"hello\nworld")


def test_a_cif_file_of_many_blocks_is_many_rows(rows):
    from kiln.tasks.dataset.formats import cif_text

    text = "".join(cif_text(row) for row in rows[:3])
    entries = list(split_text(text, "cif", "three.cif"))
    assert [parse_entry(e).row_id for e in entries] == [row.row_id for row in rows[:3]]


def test_a_bad_entry_is_an_error_naming_what_is_wrong():
    with pytest.raises(EntryError, match="could not read the cif entry"):
        parse_entry(Entry("x", "cif", "data_x\n_cell_length_a 3\nloop_\n"))
    with pytest.raises(EntryError, match="lattice"):
        parse_entry(Entry("x", "pymatgen", '{"cell": 3}'))


def test_smiles_rows_are_molecules_embedded_with_a_fixed_seed():
    entries = list(split_text("CCO ethanol\nc1ccccc1\nC1CC(\n", "smiles", "mols.smi"))
    assert [e.row_id for e in entries] == ["ethanol", "mols.smi:2", "mols.smi:3"]
    ethanol = parse_entry(entries[0])
    assert ethanol.structure.composition.formula == "H6 C2 O1" and not hasattr(ethanol.structure, "lattice")
    np.testing.assert_array_equal(parse_entry(entries[0]).structure.cart_coords, ethanol.structure.cart_coords)
    with pytest.raises(EntryError, match="SMILES"):
        parse_entry(entries[2])
