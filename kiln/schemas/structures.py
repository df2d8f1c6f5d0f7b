"""Reads the crystal structures users send to ML jobs, builds prototypes from bare formulas, and checks them.

Accepted forms (`parse_structure`):

- CIF text (the first and only data block; the cell as written, not reduced to a primitive cell);
- POSCAR / CONTCAR text;
- a pymatgen `Structure.as_dict()` dict;
- an ASE-style dict `{"numbers" | "symbols", "positions" (Cartesian, Å), "cell" (3x3 or 3 lengths), "pbc"}`;
  a missing `pbc` counts as periodic, since a cell was given;
- extended XYZ text with `Lattice="..."` on its comment line;
- a bare formula that fits one of the built-in prototypes (see `formula_prototype`).

Only periodic structures are accepted: XYZ text without a lattice, an ASE dict with `pbc` not all true,
and a pymatgen Molecule are refused rather than put in a box, because a boxed molecule would give
meaningless stresses and a cell relaxation would collapse the box. The message says how to send one
in a box explicitly.

Prototype rules for formulas (lattice constants are guesses; the job relaxes the prototype afterwards):

- element: the lattice from `ELEMENT_LATTICES` (common ground-state structures); a from the metallic radius
  r (the empirical atomic radius where pymatgen has none) (fcc a = 2√2·r, bcc a = 4r/√3, hcp a = 2r with ideal c/a = √(8/3)) or, for diamond, from the covalent
  radius (a = 8r/√3);
- AB in `ZINC_BLENDE` (either order): zinc blende, a = 4(r_A + r_B)/√3 with covalent radii;
- otherwise AB with A a metal and B an anion former (`ANION_FORMERS`), charge balanced: rock salt,
  a = 2(r_A + r_B) with Shannon crystal radii of the guessed ions;
- AB2 in `FLUORITE`: fluorite, a = 4(r_A + r_B)/√3 with ionic radii;
- ABX3 with A a metal, B a metal or metalloid, X in `PEROVSKITE_ANIONS`, charge balanced: cubic perovskite,
  a = max(2(r_B + r_X), √2(r_A + r_X)) with ionic radii.

Where an ionic radius is missing, covalent radii are used for every site of that formula.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pymatgen.core import Structure

# The most sites one structure may have: beyond it a single prediction dominates a batch's memory and time.
MAX_ATOMS = 1000
# Closer than this (Å) two atoms are a mistake in the input (duplicated sites, wrong units), not physics.
MIN_DISTANCE = 0.5
# domain_report flags a pair closer than this fraction of the sum of their covalent radii: well inside any
# bond length seen in the training data, where a potential's answer is an extrapolation.
MIN_BOND_FRACTION = 0.7

SEND_INSTEAD = "send CIF, POSCAR or a pymatgen dict"

# Common ground-state (room-temperature) lattices of elements a formula may name alone.
ELEMENT_LATTICES: dict[str, str] = {
    **dict.fromkeys(["C", "Si", "Ge", "Sn"], "diamond"),
    **dict.fromkeys(["Cu", "Al", "Ni", "Ag", "Au", "Pt", "Pb", "Pd", "Ir", "Rh", "Ca", "Sr"], "fcc"),
    **dict.fromkeys(["Fe", "W", "Mo", "Cr", "Na", "K", "V", "Li", "Nb", "Ta", "Rb", "Cs", "Ba"], "bcc"),
    **dict.fromkeys(["Mg", "Ti", "Zn", "Co", "Zr", "Be", "Cd", "Hf", "Ru", "Os", "Re", "Sc", "Y"], "hcp"),
}

# Tetrahedral AB compounds; the wurtzite ones (GaN, ZnO, AlN, CdS, ...) get their nearly degenerate
# zinc-blende polytype.
ZINC_BLENDE: frozenset[frozenset[str]] = frozenset(
    frozenset(re.findall(r"[A-Z][a-z]?", formula))
    for formula in [
        "GaAs", "GaP", "GaSb", "GaN", "InP", "InAs", "InSb", "InN", "AlP", "AlAs", "AlSb", "AlN",
        "ZnS", "ZnSe", "ZnTe", "ZnO", "CdS", "CdSe", "CdTe", "HgS", "HgSe", "HgTe", "BeO", "BeS", "BeSe",
        "SiC", "BN", "BP", "BAs", "CuCl", "CuBr", "CuI", "AgI",
    ]
)  # fmt: skip

# Fluorite AB2 compounds (A on the fcc sites, B in every tetrahedral hole).
FLUORITE: frozenset[str] = frozenset(
    [
        "CaF2", "SrF2", "BaF2", "CdF2", "HgF2", "PbF2", "EuF2", "SrCl2",
        "CeO2", "ThO2", "UO2", "NpO2", "PuO2", "AmO2", "ZrO2", "HfO2", "PrO2", "TbO2",
        "CoSi2", "NiSi2", "PtAl2", "AuAl2",
    ]
)  # fmt: skip

# Elements that take the anion site of a rock-salt AB (not H: H- has no tabulated radius, so no good guess).
ANION_FORMERS: frozenset[str] = frozenset(["C", "N", "O", "F", "P", "S", "Cl", "As", "Se", "Br", "Sb", "Te", "I"])
PEROVSKITE_ANIONS: frozenset[str] = frozenset(["O", "F", "Cl", "Br", "I", "S", "Se", "N"])

_FCC = [(0, 0, 0), (0, 0.5, 0.5), (0.5, 0, 0.5), (0.5, 0.5, 0)]
_FORMULA = re.compile(r"(?:[A-Z][a-z]?\d*)+")
_TOKEN = re.compile(r"([A-Z][a-z]?)(\d*)")


class StructureError(ValueError):
    """A structure that cannot be read, or that no ML prediction should be run on."""


@dataclass(frozen=True)
class ParsedStructure:
    structure: Structure
    # "cif" | "poscar" | "pymatgen" | "ase" | "xyz" | "formula"
    source_format: str
    # which prototype was assumed when built from a formula, e.g. "perovskite ABX3 (cubic Pm-3m, a=4.01 Å guess)"
    prototype: str | None = None


def parse_structure(value: str | dict, check: bool = True) -> ParsedStructure:
    """Reads one structure in any accepted form and checks it (unless `check` is False: it was checked when kiln
    took it); raises StructureError saying what to send instead."""
    if isinstance(value, dict):
        parsed = _parse_dict(value)
    elif isinstance(value, str):
        parsed = _parse_text(value)
    else:
        raise StructureError(f"a structure must be text or a dict, not {type(value).__name__}; {SEND_INSTEAD}")
    if check:
        check_structure(parsed.structure)
    return parsed


def check_structure(structure: Structure) -> None:
    """Refuses structures no prediction should run on: too many sites, unknown elements, overlapping atoms."""
    from pymatgen.core import DummySpecies

    check_structure_size(len(structure))
    if len(structure) == 0:
        raise StructureError(f"structure has no sites; {SEND_INSTEAD} with at least one atom")
    for species in structure.composition:
        if isinstance(species, DummySpecies):
            raise StructureError(f"{species.symbol!r} is not a chemical element; {SEND_INSTEAD} with real elements")
    if not structure.is_ordered:
        raise StructureError(
            f"structure {structure.composition.formula!r} has partially occupied sites, which an interatomic "
            "potential cannot model; send an ordered structure (e.g. a supercell with the sites filled)"
        )
    if structure.volume < 1e-3:
        raise StructureError(
            f"the cell's volume is {structure.volume:.3g} Å³; send a cell with three independent vectors"
        )
    centers, neighbours, _, distances = structure.get_neighbor_list(MIN_DISTANCE)
    if len(distances):
        k = int(distances.argmin())
        i, j = int(centers[k]), int(neighbours[k])
        other = "its periodic image" if i == j else f"atom {j} ({structure[j].species_string})"
        raise StructureError(
            f"atom {i} ({structure[i].species_string}) and {other} are {distances[k]:.3f} Å apart, closer than "
            f"{MIN_DISTANCE} Å: check for duplicated sites, the cell, or coordinates in the wrong units"
        )


def check_structure_size(sites: int) -> None:
    """Refuses a structure with more than MAX_ATOMS sites."""
    if sites > MAX_ATOMS:
        raise StructureError(
            f"structure has {sites} sites; ML predictions take at most {MAX_ATOMS} atoms per structure: "
            "send a smaller cell"
        )


def domain_report(structure: Structure, model_elements: set[str]) -> dict:
    """Whether a model can be trusted on a structure: its elements were trained on, and no bond is squeezed."""
    from pymatgen.analysis.molecule_structure_comparator import CovalentRadius

    notes = []
    symbols = sorted({site.specie.symbol for site in structure})
    unknown = [symbol for symbol in symbols if symbol not in model_elements]
    if unknown:
        notes.append(f"elements the model was not trained on: {', '.join(unknown)}")
    # Cordero's covalent radii stop at Cm; 1.5 Å stands in for the heavier actinides
    radius = {symbol: CovalentRadius.radius.get(symbol, 1.5) for symbol in symbols}
    cutoff = MIN_BOND_FRACTION * 2 * max(radius.values())
    centers, neighbours, _, distances = structure.get_neighbor_list(cutoff)
    squeezed = {}
    for i, j, distance in zip(centers, neighbours, distances):
        a, b = structure[int(i)].specie.symbol, structure[int(j)].specie.symbol
        limit = MIN_BOND_FRACTION * (radius[a] + radius[b])
        pair = tuple(sorted((a, b)))
        if distance < limit and (pair not in squeezed or distance < squeezed[pair][0]):
            squeezed[pair] = (float(distance), limit)
    for (a, b), (distance, limit) in sorted(squeezed.items()):
        notes.append(
            f"{a}-{b} distance {distance:.2f} Å is below {limit:.2f} Å "
            f"({MIN_BOND_FRACTION} × the sum of covalent radii): outside the training data"
        )
    return {"in_domain": not notes, "notes": notes}


def formula_prototype(formula: str) -> ParsedStructure:
    """Builds the prototype crystal a bare formula names (rules in the module docstring)."""
    from pymatgen.core import Element

    counts: dict[str, int] = {}
    for symbol, count in _TOKEN.findall(formula):
        if not Element.is_valid_symbol(symbol):
            raise StructureError(f"{formula!r}: {symbol!r} is not a chemical element; {SEND_INSTEAD}")
        counts[symbol] = counts.get(symbol, 0) + int(count or 1)
    divisor = math.gcd(*counts.values())
    counts = {symbol: count // divisor for symbol, count in counts.items()}
    symbols, amounts = list(counts), list(counts.values())
    reduced = "".join(f"{s}{n if n > 1 else ''}" for s, n in counts.items())

    def unknown(why: str) -> StructureError:
        return StructureError(f"{formula!r} is not a formula with a known prototype ({why}); {SEND_INSTEAD}")

    if amounts == [1]:
        (symbol,) = symbols
        if symbol not in ELEMENT_LATTICES:
            raise unknown(f"elements with a built-in lattice: {', '.join(sorted(ELEMENT_LATTICES))}")
        return _element(symbol, ELEMENT_LATTICES[symbol])
    if amounts == [1, 1]:
        a, b = symbols
        if frozenset(symbols) in ZINC_BLENDE:
            return _zinc_blende(a, b)
        oxidation = _oxidation_states(reduced)
        if Element(a).is_metal and b in ANION_FORMERS and oxidation is not None:
            return _rock_salt(a, b, oxidation)
        raise unknown("rock salt AB needs a metal then an anion, charge balanced, as in NaCl or MgO")
    if amounts == [1, 2]:
        if reduced in FLUORITE:
            return _fluorite(*symbols, _oxidation_states(reduced))
        raise unknown(f"fluorite AB2 is assumed only for {', '.join(sorted(FLUORITE))}")
    if amounts == [1, 1, 3]:
        a, b, x = symbols
        oxidation = _oxidation_states(reduced)
        if (
            Element(a).is_metal
            and (Element(b).is_metal or Element(b).is_metalloid)
            and x in PEROVSKITE_ANIONS
            and oxidation is not None
        ):
            return _perovskite(a, b, x, oxidation)
        raise unknown("perovskite ABX3 needs two metal cations then O, S, Se, N or a halide, charge balanced")
    raise unknown(
        "prototypes: perovskite ABX3, rock salt or zinc blende AB, fluorite AB2, elemental fcc/bcc/hcp/diamond"
    )


def _parse_text(text: str) -> ParsedStructure:
    stripped = text.strip()
    if not stripped:
        raise StructureError(f"the structure is empty; {SEND_INSTEAD}, or a formula such as 'NaCl'")
    if _FORMULA.fullmatch(stripped):
        return formula_prototype(stripped)
    first_line = stripped.splitlines()[0].strip()
    if re.search(r"^\s*data_", stripped, re.MULTILINE) and "_cell_length_a" in stripped:
        return _parse_cif(stripped)
    if re.fullmatch(r"\d+", first_line):
        return _parse_xyz(stripped)
    try:
        return _parse_poscar(text)
    except StructureError:
        pass  # not POSCAR either: say what the text could have been
    excerpt = stripped if len(stripped) <= 40 else stripped[:37] + "..."
    raise StructureError(
        f"could not read {excerpt!r} as a formula with a known prototype, CIF, POSCAR or extended XYZ; "
        f"{SEND_INSTEAD}, or a formula such as 'NaCl' or 'BaTiO3'"
    )


@contextmanager
def _reading(what: str, hint: str, warned: list[warnings.WarningMessage] | None = None) -> Iterator[None]:
    """The one place where whatever a parser raises on bad input becomes a StructureError saying what to send."""
    try:
        yield
    except StructureError:
        raise
    except Exception as exc:  # noqa: BLE001 - parsers raise anything from IndexError to KeyError on malformed input
        reason = " ".join(str(exc).split()) or type(exc).__name__
        problems = "; ".join(dict.fromkeys(str(w.message).splitlines()[0] for w in warned or []))
        raise StructureError(f"could not read {what}: {reason}{f' ({problems})' if problems else ''}; {hint}") from None


def _parse_cif(text: str) -> ParsedStructure:
    from pymatgen.io.cif import CifParser

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _reading(
            "the CIF", "send a CIF with a cell and _atom_site_ positions, or POSCAR or a pymatgen dict", caught
        ):
            structures = CifParser.from_str(text).parse_structures(primitive=False, on_error="raise")
    bad_elements = [str(w.message) for w in caught if "is not a valid Element" in str(w.message)]
    if bad_elements:
        raise StructureError(f"the CIF names an unknown element: {bad_elements[0]}; {SEND_INSTEAD} with real elements")
    if len(structures) != 1:
        raise StructureError(f"the CIF holds {len(structures)} structures; send one per item of `structures`")
    return ParsedStructure(structures[0], "cif")


def _parse_poscar(text: str) -> ParsedStructure:
    from pymatgen.io.vasp import Poscar

    with warnings.catch_warnings(), _reading("the text as POSCAR", SEND_INSTEAD):
        warnings.simplefilter("ignore")
        structure = Poscar.from_str(text).structure
    return ParsedStructure(structure, "poscar")


def _parse_xyz(text: str) -> ParsedStructure:
    from ase.io import read
    from pymatgen.io.ase import AseAtomsAdaptor

    with _reading("the text as extended XYZ", SEND_INSTEAD):
        try:
            frames = read(io.StringIO(text + "\n"), format="extxyz", index=":")
        except KeyError as exc:  # ASE's lookup of the symbol
            raise StructureError(f"the XYZ names {exc.args[0]!r}, which is not a chemical element") from None
    if len(frames) != 1:
        raise StructureError(f"the XYZ holds {len(frames)} frames; send one per item of `structures`")
    atoms = frames[0]
    if not atoms.pbc.all():
        raise StructureError(
            "the XYZ has no Lattice= on its comment line, so it is a molecule; ML predictions take periodic "
            'structures: add Lattice="20 0 0 0 20 0 0 0 20" (a box) to the comment line, or '
            f"{SEND_INSTEAD}"
        )
    return ParsedStructure(AseAtomsAdaptor.get_structure(atoms), "xyz")


def _parse_dict(value: dict[str, Any]) -> ParsedStructure:
    from pymatgen.core import Structure

    sites = value.get("sites", value.get("positions"))
    if isinstance(sites, list) and len(sites) > MAX_ATOMS:
        # refused before building, so an oversized request costs no parsing
        check_structure_size(len(sites))

    if value.get("@class") == "Molecule" or ("sites" in value and "lattice" not in value):
        raise StructureError(
            "a pymatgen Molecule has no cell; ML predictions take periodic structures: send "
            "Molecule.get_boxed_structure(20, 20, 20).as_dict() or a Structure's as_dict()"
        )
    if "lattice" in value and "sites" in value:
        with _reading("the pymatgen dict", "send Structure.as_dict()"):
            structure = Structure.from_dict(value)
        return ParsedStructure(structure, "pymatgen")
    if "positions" in value and "cell" in value and ("numbers" in value or "symbols" in value):
        return ParsedStructure(_structure_from_ase_dict(value), "ase")
    raise StructureError(
        f"a dict with keys {sorted(value)} is not a structure; send Structure.as_dict() (with 'lattice' and "
        "'sites') or an ASE-style dict with 'numbers' or 'symbols', 'positions', 'cell' and 'pbc'"
    )


def _structure_from_ase_dict(value: dict[str, Any]) -> Structure:
    import numpy as np
    from pymatgen.core import Element, Lattice, Structure

    pbc = np.broadcast_to(np.asarray(value.get("pbc", True), dtype=bool), (3,))
    if not pbc.all():
        raise StructureError(
            f"the ASE dict has pbc={pbc.tolist()}; ML predictions take periodic structures: send it with "
            "pbc=[true, true, true] in a cell large enough (e.g. 20 Å) to keep images apart"
        )
    hint = "send numbers (atomic numbers) or symbols, positions (N×3, Å), cell (3×3, Å) and pbc"
    with _reading("the ASE dict", hint):
        if "numbers" in value:
            species = [Element.from_Z(int(z)) for z in value["numbers"]]
        else:
            for symbol in value["symbols"]:
                if not Element.is_valid_symbol(str(symbol)):
                    raise StructureError(f"{str(symbol)!r} in the ASE dict's symbols is not a chemical element")
            species = [Element(str(s)) for s in value["symbols"]]
        cell = np.asarray(value["cell"], dtype=float)
        if cell.shape == (3,):
            cell = np.diag(cell)
        positions = np.asarray(value["positions"], dtype=float).reshape(-1, 3)
    if cell.shape != (3, 3):
        raise StructureError(
            f"the ASE dict's cell has shape {list(cell.shape)}; send a 3×3 matrix of cell vectors in Å"
        )
    if len(positions) != len(species):
        raise StructureError(f"the ASE dict has {len(species)} atoms but {len(positions)} positions; send one per atom")
    return Structure(Lattice(cell), species, positions, coords_are_cartesian=True)


def _oxidation_states(formula: str) -> dict[str, float] | None:
    """The most likely charge-balanced oxidation states, cation(s) first positive and the last element negative."""
    from pymatgen.core import Composition

    symbols = re.findall(r"[A-Z][a-z]?", formula)
    for guess in Composition(formula).oxi_state_guesses():
        if all(guess[s] > 0 for s in symbols[:-1]) and guess[symbols[-1]] < 0:
            return guess
    return None


def _radii(oxidation: dict[str, float] | None, symbols: list[str]) -> tuple[list[float], str]:
    """Ionic (Shannon crystal) radii of the guessed ions, or covalent radii for all if any ion lacks one."""
    from pymatgen.analysis.molecule_structure_comparator import CovalentRadius
    from pymatgen.core import Species

    if oxidation is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ionic = [Species(s, oxidation[s]).ionic_radius for s in symbols]
        if all(ionic):
            return [float(r) for r in ionic], "ionic radii"
    return [CovalentRadius.radius[s] for s in symbols], "covalent radii"


def _cubic(a: float, sites: list[tuple[str, tuple[float, float, float]]]) -> Structure:
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice.cubic(a), [s for s, _ in sites], [[x % 1 for x in xyz] for _, xyz in sites])


def _shifted(shift: float) -> list[tuple[float, float, float]]:
    return [(x + shift, y + shift, z + shift) for x, y, z in _FCC]


def _element(symbol: str, lattice: str) -> ParsedStructure:
    from pymatgen.analysis.molecule_structure_comparator import CovalentRadius
    from pymatgen.core import Element, Lattice, Structure

    if lattice == "diamond":
        a = 8 * CovalentRadius.radius[symbol] / math.sqrt(3)
        structure = _cubic(a, [(symbol, p) for p in _FCC + _shifted(0.25)])
        return ParsedStructure(
            structure, "formula", f"diamond (cubic Fd-3m, a={a:.2f} Å guess from the covalent radius)"
        )
    element = Element(symbol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns where it has no metallic radius (Pb)
        radius = float(element.metallic_radius or element.atomic_radius)
    if lattice == "fcc":
        a = 2 * math.sqrt(2) * radius
        structure = _cubic(a, [(symbol, p) for p in _FCC])
        return ParsedStructure(structure, "formula", f"fcc (cubic Fm-3m, a={a:.2f} Å guess from the metallic radius)")
    if lattice == "bcc":
        a = 4 * radius / math.sqrt(3)
        structure = _cubic(a, [(symbol, (0, 0, 0)), (symbol, (0.5, 0.5, 0.5))])
        return ParsedStructure(structure, "formula", f"bcc (cubic Im-3m, a={a:.2f} Å guess from the metallic radius)")
    a = 2 * radius
    c = a * math.sqrt(8 / 3)
    structure = Structure(Lattice.hexagonal(a, c), [symbol, symbol], [[1 / 3, 2 / 3, 0.25], [2 / 3, 1 / 3, 0.75]])
    return ParsedStructure(
        structure, "formula", f"hcp (hexagonal P6_3/mmc, a={a:.2f} Å, c={c:.2f} Å guess from the metallic radius)"
    )


def _rock_salt(a_symbol: str, b_symbol: str, oxidation: dict[str, float]) -> ParsedStructure:
    (r_a, r_b), source = _radii(oxidation, [a_symbol, b_symbol])
    a = 2 * (r_a + r_b)
    structure = _cubic(a, [(a_symbol, p) for p in _FCC] + [(b_symbol, p) for p in _shifted(0.5)])
    return ParsedStructure(structure, "formula", f"rock salt AB (cubic Fm-3m, a={a:.2f} Å guess from {source})")


def _zinc_blende(a_symbol: str, b_symbol: str) -> ParsedStructure:
    (r_a, r_b), source = _radii(None, [a_symbol, b_symbol])
    a = 4 * (r_a + r_b) / math.sqrt(3)
    structure = _cubic(a, [(a_symbol, p) for p in _FCC] + [(b_symbol, p) for p in _shifted(0.25)])
    return ParsedStructure(structure, "formula", f"zinc blende AB (cubic F-43m, a={a:.2f} Å guess from {source})")


def _fluorite(a_symbol: str, b_symbol: str, oxidation: dict[str, float] | None) -> ParsedStructure:
    (r_a, r_b), source = _radii(oxidation, [a_symbol, b_symbol])
    a = 4 * (r_a + r_b) / math.sqrt(3)
    structure = _cubic(a, [(a_symbol, p) for p in _FCC] + [(b_symbol, p) for p in _shifted(0.25) + _shifted(0.75)])
    return ParsedStructure(structure, "formula", f"fluorite AB2 (cubic Fm-3m, a={a:.2f} Å guess from {source})")


def _perovskite(a_symbol: str, b_symbol: str, x_symbol: str, oxidation: dict[str, float]) -> ParsedStructure:
    (r_a, r_b, r_x), source = _radii(oxidation, [a_symbol, b_symbol, x_symbol])
    a = max(2 * (r_b + r_x), math.sqrt(2) * (r_a + r_x))
    sites = [(a_symbol, (0, 0, 0)), (b_symbol, (0.5, 0.5, 0.5))]
    sites += [(x_symbol, p) for p in [(0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)]]
    return ParsedStructure(
        _cubic(a, sites), "formula", f"perovskite ABX3 (cubic Pm-3m, a={a:.2f} Å guess from {source})"
    )
