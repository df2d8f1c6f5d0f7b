"""Reading ML job structures in every accepted form, formula prototypes, checks, and the ml_predict input model."""

from __future__ import annotations

import pytest

pytest.importorskip("pymatgen")

from pydantic import ValidationError
from pymatgen.core import Lattice, Molecule, Structure
from pymatgen.io.cif import CifWriter
from pymatgen.io.vasp import Poscar

from kiln.submission import field_errors
from kiln.schemas.ml_predict import MLPredictInput
from kiln.schemas.structures import (
    ELEMENT_LATTICES,
    MAX_ATOMS,
    ParsedStructure,
    StructureError,
    check_structure,
    domain_report,
    parse_structure,
)


@pytest.fixture(scope="module")
def nacl() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def ase_dict(structure: Structure, symbols: bool = False) -> dict:
    """What ase.Atoms.todict() gives, as JSON; with symbols instead of atomic numbers if asked."""
    species = (
        {"symbols": [site.specie.symbol for site in structure]}
        if symbols
        else {"numbers": [site.specie.Z for site in structure]}
    )
    return {
        **species,
        "positions": structure.cart_coords.tolist(),
        "cell": structure.lattice.matrix.tolist(),
        "pbc": [True, True, True],
    }


def extended_xyz(structure: Structure) -> str:
    lattice = " ".join(f"{x:.8f}" for x in structure.lattice.matrix.flatten())
    lines = [str(len(structure)), f'Lattice="{lattice}" Properties=species:S:1:pos:R:3 pbc="T T T"']
    lines += [
        f"{site.specie.symbol} {x:.8f} {y:.8f} {z:.8f}" for site, (x, y, z) in zip(structure, structure.cart_coords)
    ]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("form", "source_format"),
    [
        (lambda s: str(CifWriter(s)), "cif"),
        (lambda s: Poscar(s).get_str(), "poscar"),
        (lambda s: s.as_dict(), "pymatgen"),
        (ase_dict, "ase"),
        (lambda s: ase_dict(s, symbols=True), "ase"),
        (extended_xyz, "xyz"),
    ],
    ids=["cif", "poscar", "pymatgen", "ase-numbers", "ase-symbols", "xyz"],
)
def test_every_form_reads_the_same_crystal(nacl, form, source_format):
    parsed = parse_structure(form(nacl))
    assert parsed.source_format == source_format
    assert parsed.prototype is None
    assert len(parsed.structure) == len(nacl)
    assert parsed.structure.lattice.abc == pytest.approx(nacl.lattice.abc, abs=1e-5)
    assert parsed.structure.composition == nacl.composition
    assert parsed.structure.matches(nacl, primitive_cell=False, scale=False)


@pytest.mark.parametrize(
    ("formula", "prototype", "sites", "a_measured"),
    [
        ("BaTiO3", "perovskite ABX3", 5, 4.00),
        ("NaCl", "rock salt AB", 8, 5.64),
        ("GaAs", "zinc blende AB", 8, 5.65),
        ("CaF2", "fluorite AB2", 12, 5.46),
        ("Si", "diamond", 8, 5.43),
        ("Cu", "fcc", 4, 3.615),
        ("Fe", "bcc", 2, 2.867),
        ("Mg", "hcp", 2, 3.209),
    ],
)
def test_formula_builds_its_prototype(formula, prototype, sites, a_measured):
    parsed = parse_structure(formula)
    assert parsed.source_format == "formula"
    assert parsed.prototype.startswith(prototype)
    assert "guess" in parsed.prototype
    assert parsed.structure.composition.reduced_formula == formula
    assert len(parsed.structure) == sites
    # a guess for the relaxation to start from: within 7% of the measured lattice constant
    assert parsed.structure.lattice.a == pytest.approx(a_measured, rel=0.07)
    assert f"a={parsed.structure.lattice.a:.2f}" in parsed.prototype


def test_prototypes_have_their_space_groups():
    expected = {"BaTiO3": 221, "NaCl": 225, "GaAs": 216, "CaF2": 225, "Si": 227, "Cu": 225, "Fe": 229, "Mg": 194}
    found = {formula: parse_structure(formula).structure.get_space_group_info()[1] for formula in expected}
    assert found == expected


def test_hcp_has_the_ideal_axial_ratio():
    lattice = parse_structure("Mg").structure.lattice
    assert lattice.c / lattice.a == pytest.approx((8 / 3) ** 0.5)


def test_formula_order_and_multiples():
    assert parse_structure("AsGa").prototype.startswith("zinc blende")
    assert parse_structure("Na2Cl2").structure.composition.reduced_formula == "NaCl"


def test_every_element_in_the_table_builds():
    for symbol, lattice in ELEMENT_LATTICES.items():
        assert parse_structure(symbol).prototype.startswith(lattice)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("BaTiO", ["'BaTiO' is not a formula with a known prototype", "send CIF, POSCAR or a pymatgen dict"]),
        ("Xx2O3", ["'Xx' is not a chemical element"]),
        ("CuZn", ["not a formula with a known prototype", "rock salt"]),
        ("TiO2", ["not a formula with a known prototype", "fluorite"]),
        ("Xe", ["not a formula with a known prototype"]),
        ("hello world, this is not a crystal", ["could not read", "CIF, POSCAR"]),
        ("   ", ["empty"]),
        ({"a": 1}, ["is not a structure", "as_dict()"]),
        (42, ["text or a dict"]),
        ("2\nno lattice here\nH 0 0 0\nH 0 0 0.74\n", ["Lattice=", "molecule"]),
        (Molecule(["H", "H"], [[0, 0, 0], [0, 0, 0.74]]).as_dict(), ["Molecule", "get_boxed_structure"]),
        ({"symbols": ["Na"], "positions": [[0, 0, 0]], "cell": [5, 5, 5], "pbc": False}, ["pbc", "periodic"]),
        ({"symbols": ["Xx"], "positions": [[0, 0, 0]], "cell": [5, 5, 5], "pbc": True}, ["'Xx'"]),
        ("data_broken\n_cell_length_a 5\nnonsense here\n", ["could not read the CIF"]),
    ],
    ids=lambda v: str(v)[:20],
)
def test_unreadable_structures_say_what_to_send(value, words):
    with pytest.raises(StructureError) as caught:
        parse_structure(value)
    for word in words:
        assert word in str(caught.value)


def test_unknown_element_in_a_poscar_is_named(nacl):
    with pytest.raises(StructureError, match="'Xx' is not a chemical element"):
        parse_structure(Poscar(nacl).get_str().replace("Na Cl", "Xx Cl"))


def test_unknown_element_in_a_cif_is_named(nacl):
    with pytest.raises(StructureError, match="'Xx' is not a valid Element"):
        parse_structure(str(CifWriter(nacl)).replace("Na", "Xx"))


def test_overlapping_atoms_are_refused_with_the_pair_and_distance():
    crowded = Structure(Lattice.cubic(5), ["Na", "Cl"], [[0, 0, 0], [0.02, 0, 0]])
    with pytest.raises(StructureError, match=r"atom [01] \((Na|Cl)\) and atom [01] \((Na|Cl)\) are 0\.100 Å apart"):
        parse_structure(crowded.as_dict())


def test_an_input_kiln_took_is_read_back_in_the_worker_without_its_checks():
    crowded = Structure(Lattice.cubic(5), ["Na", "Cl"], [[0, 0, 0], [0.02, 0, 0]]).as_dict()
    with pytest.raises(ValidationError, match="0.100 Å apart"):
        MLPredictInput.read({"structures": [crowded]})
    # kiln.job_inputs.passed_through reads what the API checked when it took it: read, not checked again
    read_back = MLPredictInput.read({"structures": [crowded]}, checked=True)
    assert [len(item.structure) for item in read_back.parsed()] == [2]


def test_an_atom_overlapping_its_own_image_is_refused():
    with pytest.raises(StructureError, match="its periodic image"):
        check_structure(Structure(Lattice.cubic(0.3), ["Na"], [[0, 0, 0]]))


def test_too_many_atoms_names_the_limit(nacl):
    big = nacl * (14, 14, 14)  # 21952 sites
    for value in (big.as_dict(), big):
        with pytest.raises(StructureError, match=f"at most {MAX_ATOMS} atoms"):
            parse_structure(value) if isinstance(value, dict) else check_structure(value)
    assert MAX_ATOMS == 1000


def test_ten_thousand_atoms_in_a_poscar_names_the_limit():
    big = Structure(Lattice.cubic(2.5), ["Si"], [[0, 0, 0]]) * (20, 20, 25)
    assert len(big) == 10000
    with pytest.raises(StructureError, match="10000 sites.*at most 1000 atoms"):
        parse_structure(Poscar(big).get_str())


def test_partial_occupancy_is_refused():
    with pytest.raises(StructureError, match="partially occupied"):
        check_structure(Structure(Lattice.cubic(5), [{"Na": 0.5, "K": 0.5}], [[0, 0, 0]]))


def test_domain_report():
    nacl = parse_structure("NaCl").structure
    assert domain_report(nacl, {"Na", "Cl", "O"}) == {"in_domain": True, "notes": []}
    report = domain_report(nacl, {"Na"})
    assert report["in_domain"] is False
    assert "Cl" in report["notes"][0]
    squeezed = Structure(Lattice.cubic(10), ["Si", "Si"], [[0, 0, 0], [0.12, 0, 0]])  # 1.2 Å, bond ~2.35 Å
    report = domain_report(squeezed, {"Si"})
    assert report["in_domain"] is False
    assert "Si-Si distance 1.20 Å" in report["notes"][0]


def test_parsed_structure_is_frozen():
    parsed = parse_structure("Cu")
    assert isinstance(parsed, ParsedStructure)
    with pytest.raises(AttributeError):
        parsed.prototype = "bcc"


def input_error(**fields) -> str:
    with pytest.raises(ValidationError) as caught:
        MLPredictInput(**fields)
    return field_errors(caught.value, "input")


def test_input_defaults_and_raw_values_kept(nacl):
    model = MLPredictInput(structures=["NaCl", nacl.as_dict()])
    assert model.model == "tensornet-matpes-pbe"
    assert model.property == "energy"
    assert model.relax.optimizer == "FIRE" and model.relax.fmax == 0.05 and model.relax.steps == 500
    assert model.relax.relax_cell is True and model.batch_size is None
    assert model.model_dump(mode="json")["structures"][0] == "NaCl"
    assert [p.source_format for p in model.parsed()] == ["formula", "pymatgen"]
    assert model.parsed() is model.parsed()
    assert len(MLPredictInput(structure="Si").parsed()) == 1
    stored = model.model_dump_json()
    assert MLPredictInput.model_validate_json(stored).model_dump_json() == stored


def test_the_canonical_input_is_one_whatever_the_encoding_site_order_and_periodic_image(nacl):
    shuffled = Structure(nacl.lattice, list(reversed(nacl.species)), [[x + 1 for x in site.frac_coords] for site in
                         reversed(nacl)])  # fmt: skip
    forms = [str(CifWriter(nacl)), Poscar(nacl).get_str(), nacl.as_dict(), ase_dict(nacl), shuffled.as_dict()]
    canonical = [MLPredictInput.read({"structure": form}).canonical() for form in forms]
    assert all(c == canonical[0] for c in canonical[1:])
    assert canonical[0]["structure"]["lattice"] == [[5.64, 0.0, 0.0], [0.0, 5.64, 0.0], [0.0, 0.0, 5.64]]
    assert canonical[0]["structure"]["sites"][:2] == [("Cl", [0.0, 0.0, 0.5]), ("Cl", [0.0, 0.5, 0.0])]
    assert canonical[0]["structure"]["prototype"] is None


def test_input_names_the_bad_structure():
    assert input_error(structure="BaTiO").startswith("input.structure: Value error, 'BaTiO' is not a formula")
    message = input_error(structures=["NaCl", "Si", "Cu", "Xx2O3"])
    assert message.startswith("input.structures.3: Value error, 'Xx2O3': 'Xx' is not a chemical element")


def test_input_needs_exactly_one_of_structure_or_structures():
    for fields, got in [({}, "neither"), ({"structure": "Si", "structures": ["Si"]}, "both")]:
        message = input_error(**fields)
        assert "`structure`" in message and "`structures`" in message and got in message


@pytest.mark.parametrize(
    ("fields", "location"),
    [
        ({"structures": []}, "input.structures"),
        ({"structures": ["Si"] * 10001}, "input.structures"),
        ({"structure": "Si", "relax": {"fmax": 0}}, "input.relax.fmax"),
        ({"structure": "Si", "relax": {"steps": 10001}}, "input.relax.steps"),
        ({"structure": "Si", "relax": {"optimizer": "SD"}}, "input.relax.optimizer"),
        ({"structure": "Si", "batch_size": 0}, "input.batch_size"),
        ({"structure": "Si", "batch_size": 1025}, "input.batch_size"),
        ({"structure": "Si", "property": "bandgap"}, "input.property"),
        ({"structure": "Si", "temperature": 300}, "input.temperature"),
    ],
)
def test_input_limits(fields, location):
    assert input_error(**fields).startswith(location + ":")


def test_every_input_field_is_described():
    for model in (MLPredictInput, MLPredictInput.model_fields["relax"].annotation):
        for name, field in model.model_fields.items():
            assert field.description, name
