"""Reading and writing datasets of structures, losslessly: CIF, POSCAR, extended XYZ, pymatgen JSON, Parquet, ASE db, SMILES.

A dataset is rows: a `row_id`, a structure (a pymatgen Structure, or a Molecule for molecules) and scalar
properties (columns). Reading is in two halves so that a large file is split cheaply and parsed where the
work runs: `split_entries` cuts a file into entries (a CIF data block, an XYZ frame, a POSCAR, a JSON record,
a SMILES line) without parsing them, and `parse_entry` reads one entry into a row, raising on a bad one so
that the caller records it as that row's error.

Lossless means every writer here keeps the lattice and coordinates to full float64 precision (floats are
written with repr, which reads back to the same bits: ASE's extxyz writer prints 8 decimals, and pymatgen's
CifWriter 8 significant figures, and CifParser snaps coordinates near 1/3, 1/4, … to them), the species
with their oxidation states, and every site property. Where a format has no place for something (a POSCAR
has none for charges or properties; CIF none for a row's properties), kiln writes it in a place the format
allows — a `_kiln_row` text field in CIF, a `kiln_row` key on an XYZ comment line, a manifest in a zip of
POSCARs, an ASE db row's data — and reads it back from there. A CIF has no orientation: its cell is read
back in pymatgen's standard orientation, the same lattice rotated.
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# what parse_entry reads: the text of one entry, or a pymatgen dict as JSON
ENTRY_KINDS = ("cif", "poscar", "extxyz", "pymatgen", "smiles")
# file suffixes of each input format; a .zip is read member by member
SUFFIXES = {
    ".cif": "cif", ".mcif": "cif", ".vasp": "poscar", ".poscar": "poscar", ".xyz": "extxyz", ".extxyz": "extxyz",
    ".json": "json", ".parquet": "parquet", ".pq": "parquet", ".db": "ase-db", ".smi": "smiles", ".smiles": "smiles",
}  # fmt: skip
# the file a row-property manifest of a zip of POSCARs is kept in
POSCAR_MANIFEST = "kiln-rows.json"
KILN_ROW_KEY = "kiln_row"

Scalar = str | int | float | bool | None


class EntryError(ValueError):
    """One entry of a dataset could not be read into a structure."""


@dataclass
class Entry:
    """One row of a dataset, not yet parsed: the text of its entry (or a pymatgen dict as JSON), and its properties."""

    row_id: str
    kind: str
    raw: str
    properties: dict[str, Scalar] = field(default_factory=dict)


@dataclass
class Row:
    """One row read: its id, its structure (pymatgen Structure or Molecule) and its scalar properties."""

    row_id: str
    structure: Any
    properties: dict[str, Scalar] = field(default_factory=dict)


# detection


def detect_format(name: str, head: bytes) -> str:
    """The format of a file by its name, else by its first bytes; EntryError when neither says."""
    lower = name.lower()
    suffix = Path(lower).suffix
    if suffix == ".zip":
        return "zip"
    if suffix in SUFFIXES:
        return SUFFIXES[suffix]
    base = Path(lower).name
    if base.startswith(("poscar", "contcar")):
        return "poscar"
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"SQLite format 3"):
        return "ase-db"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    text = head.decode("utf-8", "replace").lstrip()
    if text.startswith(("[", "{")):
        return "json"
    if re.match(r"(#.*\n)*\s*data_", text):
        return "cif"
    first = text.split("\n", 1)[0].strip()
    if first.isdigit():
        return "extxyz"
    lines = text.splitlines()
    if len(lines) > 2 and re.fullmatch(r"[-+0-9.eE]+", lines[1].strip() or "x"):
        return "poscar"
    raise EntryError(f"{name}: cannot tell its format from its name or content; name the format")


# splitting files into entries


def split_entries(path: Path, fmt: str, name: str | None = None) -> Iterator[Entry]:
    """The entries of one file, in order, unparsed. `fmt` may be "auto"; `name` is how row ids call the file."""
    path = Path(path)
    name = name or path.name
    if fmt == "auto":
        with path.open("rb") as handle:
            fmt = detect_format(name, handle.read(4096))
    if fmt == "zip":
        yield from _split_zip(path, name)
    elif fmt == "parquet":
        yield from _split_parquet(path, name)
    elif fmt == "ase-db":
        yield from _split_ase_db(path, name)
    else:
        yield from split_text(path.read_text(encoding="utf-8", errors="replace"), fmt, name)


def split_text(text: str, fmt: str, name: str) -> Iterator[Entry]:
    if fmt == "cif":
        blocks = re.split(r"(?m)^(?=data_)", text)
        blocks = [block for block in blocks if block.lstrip().startswith("data_")]
        for index, block in enumerate(blocks):
            label = block.lstrip()[5:].split(None, 1)[0] if len(block.lstrip()) > 5 else str(index)
            yield Entry(name if len(blocks) == 1 else f"{name}:{label}", "cif", block)
    elif fmt == "poscar":
        yield Entry(name, "poscar", text)
    elif fmt == "extxyz":
        yield from _split_xyz(text, name)
    elif fmt == "json":
        yield from _split_json(text, name)
    elif fmt == "smiles":
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            smiles, _, label = line.partition(" ")
            yield Entry(label.strip() or f"{name}:{number}", "smiles", smiles)
    else:
        raise EntryError(f"{name}: unknown format {fmt!r}")


def _split_xyz(text: str, name: str) -> Iterator[Entry]:
    lines = text.splitlines()
    start, frame = 0, 0
    while start < len(lines):
        if not lines[start].strip():
            start += 1
            continue
        head = lines[start].strip()
        count = int(head) if head.isdigit() else None
        if count is None:
            # not a frame's atom count: the rest cannot be framed; it is one bad entry
            yield Entry(f"{name}:{frame}", "extxyz", "\n".join(lines[start:]))
            return
        end = start + 2 + count
        yield Entry(f"{name}:{frame}", "extxyz", "\n".join(lines[start:end]) + "\n")
        start, frame = end, frame + 1


def _split_json(text: str, name: str) -> Iterator[Entry]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        yield Entry(name, "pymatgen", text[:200], {"__error__": f"not JSON ({exc})"})
        return
    if isinstance(data, dict) and ("@class" in data or "lattice" in data or "sites" in data):
        items: list[tuple[str, Any]] = [(name, data)]
    elif isinstance(data, dict):
        items = [(str(key), value) for key, value in data.items()]
    elif isinstance(data, list):
        items = [(f"{name}:{index}", value) for index, value in enumerate(data)]
    else:
        items = [(name, data)]
    for default_id, item in items:
        if isinstance(item, dict) and "structure" in item:
            row_id = str(item.get("row_id", default_id))
            properties = item.get("properties") or {k: v for k, v in item.items() if k not in ("structure", "row_id")}
            yield Entry(row_id, "pymatgen", json.dumps(item["structure"]), _scalars(properties))
        else:
            yield Entry(default_id, "pymatgen", json.dumps(item))


def _split_parquet(path: Path, name: str) -> Iterator[Entry]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if "structure" not in table.column_names:
        raise EntryError(f"{name}: a Parquet dataset needs a `structure` column (pymatgen dicts as JSON text)")
    columns = table.to_pydict()
    ids = columns.pop("row_id", None)
    structures = columns.pop("structure")
    for index, structure in enumerate(structures):
        row_id = str(ids[index]) if ids is not None else f"{name}:{index}"
        raw = structure if isinstance(structure, str) else json.dumps(structure)
        yield Entry(row_id, "pymatgen", raw, {key: _scalar(values[index]) for key, values in columns.items()})


def _split_ase_db(path: Path, name: str) -> Iterator[Entry]:
    import ase.db

    with ase.db.connect(str(path), type="db", create_indices=False) as db:
        for db_row in db.select():
            atoms = db_row.toatoms()
            kiln = (db_row.data or {}).get(KILN_ROW_KEY) or {}
            row_id = str(kiln.get("row_id", f"{name}:{db_row.id}"))
            try:
                structure = atoms_to_structure(atoms, kiln)
                raw = json.dumps(structure.as_dict())
            except Exception as exc:  # noqa: BLE001 - a bad row is that row's error
                yield Entry(row_id, "pymatgen", "", {"__error__": f"{type(exc).__name__}: {exc}"})
                continue
            properties = kiln.get("properties") or dict(db_row.key_value_pairs)
            yield Entry(row_id, "pymatgen", raw, _scalars(properties))


def _split_zip(path: Path, name: str) -> Iterator[Entry]:
    with zipfile.ZipFile(path) as archive:
        members = [m for m in archive.infolist() if not m.is_dir() and not Path(m.filename).name.startswith(".")]
        manifest = {}
        if POSCAR_MANIFEST in archive.namelist():
            manifest = json.loads(archive.read(POSCAR_MANIFEST))
        for member in members:
            if member.filename == POSCAR_MANIFEST:
                continue
            data = archive.read(member)
            fmt = detect_format(member.filename, data[:4096])
            if fmt in ("parquet", "ase-db", "zip"):
                raise EntryError(f"{name}: member {member.filename} is {fmt}; a zip holds text files (CIF, POSCAR, XYZ, "
                                 "JSON, SMILES)")  # fmt: skip
            for entry in split_text(data.decode("utf-8", "replace"), fmt, member.filename):
                extra = manifest.get(member.filename)
                if extra:
                    entry.row_id = extra.get("row_id", entry.row_id)
                    entry.properties = extra.get("properties", {})
                    entry.raw = json.dumps({"__poscar__": entry.raw, KILN_ROW_KEY: extra}) if fmt == "poscar" else entry.raw
                yield entry


# parsing one entry


def parse_entry(entry: Entry, smiles_seed: int = 42) -> Row:
    """The row an entry holds; EntryError saying what is wrong with it."""
    if "__error__" in entry.properties:
        raise EntryError(str(entry.properties["__error__"]))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            reader = _READERS[entry.kind]
        except KeyError:
            raise EntryError(f"unknown entry kind {entry.kind!r}") from None
        try:
            row = reader(entry, smiles_seed)
        except EntryError:
            raise
        except Exception as exc:  # noqa: BLE001 - every reader raises its own kinds
            raise EntryError(f"could not read the {entry.kind} entry: {type(exc).__name__}: {exc}") from None
    if len(row.structure) == 0:
        raise EntryError("the entry has no sites")
    return row


def _read_cif(entry: Entry, _seed: int) -> Row:
    from pymatgen.io.cif import CifParser

    # frac_tolerance=0: CifParser otherwise snaps coordinates within 1e-4 of 1/3, 1/4, … onto them
    parser = CifParser(io.StringIO(entry.raw), frac_tolerance=0, site_tolerance=1e-6)
    structures = parser.parse_structures(primitive=False, on_error="raise")
    if not structures:
        raise EntryError("the CIF block holds no structure")
    structure = structures[0]
    block = next(iter(parser._cif.data.values()))
    extra = block.data.get(f"_{KILN_ROW_KEY}")
    properties = dict(entry.properties)
    if extra:
        kiln = json.loads(str(extra).strip())
        _restore(structure, kiln)
        properties = kiln.get("properties", properties)
        entry.row_id = kiln.get("row_id", entry.row_id)
    return Row(entry.row_id, structure, properties)


def _read_poscar(entry: Entry, _seed: int) -> Row:
    from pymatgen.io.vasp import Poscar

    kiln: dict = {}
    text = entry.raw
    if text.startswith('{"__poscar__"'):
        wrapped = json.loads(text)
        text, kiln = wrapped["__poscar__"], wrapped[KILN_ROW_KEY]
    structure = Poscar.from_str(text, read_velocities=False).structure
    if kiln:
        _restore(structure, kiln)
    return Row(entry.row_id, structure, dict(entry.properties))


def _read_extxyz(entry: Entry, _seed: int) -> Row:
    import ase.io

    atoms = ase.io.read(io.StringIO(entry.raw), format="extxyz")
    kiln = atoms.info.pop(KILN_ROW_KEY, None)
    kiln = json.loads(kiln) if isinstance(kiln, str) else {}
    structure = atoms_to_structure(atoms, kiln)
    if kiln:
        properties = kiln.get("properties", {})
        row_id = kiln.get("row_id", entry.row_id)
    else:
        results = dict(atoms.calc.results) if atoms.calc is not None else {}
        properties = {**_scalars(atoms.info), **{k: float(v) for k, v in results.items() if np.ndim(v) == 0}}
        row_id = entry.row_id
    return Row(row_id, structure, properties)


def _read_pymatgen(entry: Entry, _seed: int) -> Row:
    from pymatgen.core import Molecule, Structure

    data = json.loads(entry.raw)
    if not isinstance(data, dict):
        raise EntryError(f"expected a pymatgen Structure or Molecule dict, got {type(data).__name__}")
    if data.get("@class") == "Molecule" or ("lattice" not in data and "sites" in data):
        return Row(entry.row_id, Molecule.from_dict(data), dict(entry.properties))
    if "lattice" not in data:
        raise EntryError("a pymatgen Structure dict needs `lattice` and `sites`")
    return Row(entry.row_id, Structure.from_dict(data), dict(entry.properties))


def _read_smiles(entry: Entry, seed: int) -> Row:
    from pymatgen.core import Molecule

    from kiln.schemas.molecules import MoleculeError, molecule_from_smiles

    try:
        atoms = molecule_from_smiles(entry.raw, seed)
    except MoleculeError as exc:
        raise EntryError(str(exc).removeprefix("molecule: ")) from None
    molecule = Molecule(atoms.get_chemical_symbols(), atoms.positions, properties={"smiles": entry.raw})
    return Row(entry.row_id, molecule, {"smiles": entry.raw, **entry.properties})


_READERS = {"cif": _read_cif, "poscar": _read_poscar, "extxyz": _read_extxyz, "pymatgen": _read_pymatgen,
            "smiles": _read_smiles}  # fmt: skip


# ASE Atoms <-> pymatgen, with every per-atom array kept


def atoms_to_structure(atoms, kiln: dict | None = None):
    """A pymatgen Structure (Molecule when not periodic) from ASE Atoms: positions exact, per-atom arrays as site
    properties (ASE's `initial_charges` as `charge`, `initial_magmoms` as `magmom`), results of an attached
    calculator too; `kiln` (what a kiln writer stored) restores oxidation states and every site property."""
    from pymatgen.core import Lattice, Molecule, Structure

    kiln = kiln or {}
    site_properties: dict[str, list] = {}
    for key, values in atoms.arrays.items():
        if key in ("numbers", "positions"):
            continue
        name = {"initial_charges": "charge", "initial_magmoms": "magmom"}.get(key, key)
        site_properties[name] = [_plain(v) for v in values]
    if atoms.calc is not None:
        for key, values in atoms.calc.results.items():
            if np.ndim(values) >= 1 and len(values) == len(atoms):
                site_properties[key] = [_plain(v) for v in values]
    site_properties.pop("oxi_states", None)
    if kiln:
        site_properties = {}  # what kiln wrote is the whole truth: its extras hold every site property
    symbols = atoms.get_chemical_symbols()
    if atoms.pbc.any() or atoms.cell.rank == 3:
        structure = Structure(Lattice(np.array(atoms.cell[:], dtype=float), pbc=tuple(bool(p) for p in atoms.pbc)),
                              symbols, atoms.positions, coords_are_cartesian=True, to_unit_cell=False)  # fmt: skip
    else:
        structure = Molecule(symbols, atoms.positions)
    for name, values in site_properties.items():
        structure.add_site_property(name, values)
    _restore(structure, kiln)
    return structure


def structure_to_atoms(structure, kiln_columns: bool = True):
    """ASE Atoms of a Structure or Molecule: exact positions and cell; numeric site properties as per-atom arrays
    (`charge` as ASE's initial charges, `magmom` as initial magnetic moments), oxidation states as `oxi_states`."""
    from ase import Atoms

    positions = np.array(structure.cart_coords, dtype=float)
    symbols = [site.specie.symbol for site in structure]
    if hasattr(structure, "lattice"):
        atoms = Atoms(symbols=symbols, positions=positions, cell=np.array(structure.lattice.matrix, dtype=float),
                      pbc=tuple(bool(p) for p in structure.lattice.pbc))  # fmt: skip
    else:
        atoms = Atoms(symbols=symbols, positions=positions, pbc=False)
    for name, values in structure.site_properties.items():
        if not _numeric_array(values):
            continue
        array = np.array(values)
        if kiln_columns:
            atoms.set_array(name, array)
        elif name in ("charge", "magmom") and array.ndim == 1:
            # ASE's own names, for programs that read the file with ASE; kiln's extras keep every site property
            atoms.set_array({"charge": "initial_charges", "magmom": "initial_magmoms"}[name], array.astype(float))
    oxidation = _oxidation_states(structure)
    if oxidation is not None:
        atoms.set_array("oxi_states", np.array(oxidation, dtype=float))
    return atoms


def _kiln_extras(structure, row_id: str, properties: dict) -> dict:
    """What kiln writes beside a structure where a format has no place of its own for it."""
    extras: dict[str, Any] = {"row_id": row_id, "properties": properties}
    oxidation = _oxidation_states(structure)
    if oxidation is not None:
        extras["oxidation_states"] = oxidation
    if structure.site_properties:
        extras["site_properties"] = _jsonable(structure.site_properties)
    if structure.properties:
        extras["structure_properties"] = _jsonable(structure.properties)
    if hasattr(structure, "lattice"):
        extras["lattice"] = structure.lattice.matrix.tolist()
    return extras


def _restore(structure, kiln: dict) -> None:
    """Puts back what kiln wrote beside a structure (see _kiln_extras)."""
    from pymatgen.core import Lattice

    if not kiln:
        return
    if "lattice" in kiln and hasattr(structure, "lattice"):
        # a CIF's cell comes back in pymatgen's standard orientation: the written matrix restores the original one,
        # keeping the fractional coordinates (the same crystal, not rotated)
        matrix = np.array(kiln["lattice"], dtype=float)
        if np.allclose(Lattice(matrix).parameters, structure.lattice.parameters, rtol=0, atol=1e-6):
            structure.lattice = Lattice(matrix, pbc=structure.lattice.pbc)
    if "cells" in kiln:
        frac = structure.frac_coords
        target = frac - np.floor(np.round(frac, 2)) + np.array(kiln["cells"])
        for index, coords in enumerate(target):
            structure[index] = structure[index].species, coords
    oxidation = kiln.get("oxidation_states")
    if oxidation is not None:
        for index, state in enumerate(oxidation):
            site = structure[index]
            if state is not None and getattr(site.specie, "oxi_state", None) != state:
                structure.replace(index, _species(site.specie.symbol, state), properties=site.properties)
    for name, values in (kiln.get("site_properties") or {}).items():
        structure.add_site_property(name, values)
    if kiln.get("structure_properties"):
        structure.properties.update(kiln["structure_properties"])


def _species(symbol: str, state: float):
    from pymatgen.core import Species

    return Species(symbol, state)


def _oxidation_states(structure) -> list | None:
    states = [getattr(site.specie, "oxi_state", None) for site in structure]
    return None if all(s is None for s in states) else [None if s is None else float(s) for s in states]


# writing


def write_dataset(rows: list[Row], fmt: str, path: Path) -> Path:
    """Writes the rows to `path` in `fmt` (parquet, extxyz, json, cif-zip, poscar-zip, ase-db); returns the path."""
    path = Path(path)
    _WRITERS[fmt](rows, path)
    return path


def _write_parquet(rows: list[Row], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = rows_table(rows)
    pq.write_table(pa.Table.from_pydict(table), path)


def rows_table(rows: list[Row]) -> dict[str, list]:
    """The rows as columns: row_id, structure (the pymatgen dict as JSON text) and one column per property."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row.properties))
    table: dict[str, list] = {"row_id": [row.row_id for row in rows],
                              "structure": [json.dumps(row.structure.as_dict()) for row in rows]}  # fmt: skip
    for name in names:
        table[name] = [row.properties.get(name) for row in rows]
    return table


def _write_json(rows: list[Row], path: Path) -> None:
    with path.open("w") as out:
        json.dump([{"row_id": r.row_id, "structure": r.structure.as_dict(), "properties": r.properties} for r in rows],
                  out)  # fmt: skip


def _write_extxyz(rows: list[Row], path: Path) -> None:
    with path.open("w") as out:
        for row in rows:
            out.write(extxyz_frame(row))


def extxyz_frame(row: Row) -> str:
    """One extended XYZ frame with every float written to full precision (repr), and kiln's extras on the comment line."""
    atoms = structure_to_atoms(row.structure)
    columns = [("species", "S", 1)]
    arrays: list[np.ndarray] = []
    columns.append(("pos", "R", 3))
    for key, values in atoms.arrays.items():
        if key in ("numbers", "positions"):
            continue
        values = np.asarray(values)
        kind = "L" if values.dtype == bool else "I" if np.issubdtype(values.dtype, np.integer) else "R"
        width = 1 if values.ndim == 1 else values.shape[1]
        columns.append((key, kind, width))
        arrays.append(values.reshape(len(atoms), -1))
    header = []
    if hasattr(row.structure, "lattice"):
        header.append('Lattice="' + " ".join(repr(float(x)) for x in atoms.cell[:].reshape(-1)) + '"')
    header.append("Properties=" + ":".join(f"{n}:{k}:{w}" for n, k, w in columns))
    header.append('pbc="' + " ".join("T" if p else "F" for p in atoms.pbc) + '"')
    extras = json.dumps(_kiln_extras(row.structure, row.row_id, row.properties))
    header.append(f'{KILN_ROW_KEY}="' + extras.replace("\\", "\\\\").replace('"', '\\"') + '"')
    lines = [str(len(atoms)), " ".join(header)]
    symbols = atoms.get_chemical_symbols()
    for index in range(len(atoms)):
        fields = [symbols[index], *(repr(float(x)) for x in atoms.positions[index])]
        for values in arrays:
            fields += [_xyz_value(v) for v in values[index]]
        lines.append(" ".join(fields))
    return "\n".join(lines) + "\n"


def _xyz_value(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "T" if value else "F"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return repr(float(value))


def cif_text(row: Row) -> str:
    """The row as one CIF data block (P1, every site), coordinates to 17 significant figures, kiln's extras in
    a `_kiln_row` text field."""
    from pymatgen.io.cif import CifWriter

    if not hasattr(row.structure, "lattice"):
        raise EntryError("a molecule has no cell: write it as extxyz or json")
    text = str(CifWriter(row.structure, significant_figures=17))
    extras = _kiln_extras(row.structure, row.row_id, row.properties)
    # CifParser moves every site into the cell; the cell each was in (coordinates to 0.01) puts it back
    extras["cells"] = np.floor(np.round(row.structure.frac_coords, 2)).astype(int).tolist()
    return text.rstrip("\n") + f"\n_{KILN_ROW_KEY}\n;\n{json.dumps(extras)}\n;\n"


def _file_names(rows: list[Row], suffix: str) -> list[str]:
    """A file name per row inside a zip: the row id made safe, unique."""
    seen: set[str] = set()
    names = []
    for row in rows:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", row.row_id).strip("._") or "row"
        name, n = f"{base}{suffix}", 1
        while name in seen:
            n += 1
            name = f"{base}-{n}{suffix}"
        seen.add(name)
        names.append(name)
    return names


def _write_cif_zip(rows: list[Row], path: Path) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for row, name in zip(rows, _file_names(rows, ".cif")):
            archive.writestr(name, cif_text(row))


def _write_poscar_zip(rows: list[Row], path: Path) -> None:
    from pymatgen.io.vasp import Poscar

    manifest = {}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for row, name in zip(rows, _file_names(rows, ".vasp")):
            if not hasattr(row.structure, "lattice"):
                raise EntryError(f"{row.row_id}: a molecule has no cell: write it as extxyz or json")
            bare = row.structure.copy()
            bare.remove_oxidation_states()
            for key in list(bare.site_properties):
                bare.remove_site_property(key)
            archive.writestr(name, Poscar(bare, comment=row.row_id).get_str(significant_figures=17))
            manifest[name] = _kiln_extras(row.structure, row.row_id, row.properties)
        archive.writestr(POSCAR_MANIFEST, json.dumps(manifest))


def _write_ase_db(rows: list[Row], path: Path) -> None:
    import ase.db

    path.unlink(missing_ok=True)
    with ase.db.connect(str(path), type="db", append=False) as db:
        for row in rows:
            atoms = structure_to_atoms(row.structure, kiln_columns=False)
            pairs = {k: v for k, v in row.properties.items()
                     if isinstance(v, (int, float, str, bool)) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)
                     and k not in _ASE_RESERVED}  # fmt: skip
            db.write(atoms, key_value_pairs=pairs,
                     data={KILN_ROW_KEY: _kiln_extras(row.structure, row.row_id, row.properties)})  # fmt: skip


_ASE_RESERVED = {"id", "unique_id", "ctime", "mtime", "user", "calculator", "energy", "natoms", "magmom", "charge",
                 "fmax", "smax", "volume", "mass", "formula", "age", "pbc", "numbers", "positions", "cell"}  # fmt: skip

_WRITERS = {"parquet": _write_parquet, "json": _write_json, "extxyz": _write_extxyz, "cif-zip": _write_cif_zip,
            "poscar-zip": _write_poscar_zip, "ase-db": _write_ase_db}  # fmt: skip
OUTPUT_SUFFIX = {"parquet": ".parquet", "json": ".json", "extxyz": ".extxyz", "cif-zip": "-cif.zip",
                 "poscar-zip": "-poscar.zip", "ase-db": ".db"}  # fmt: skip


def read_dataset(path: Path, fmt: str = "auto", smiles_seed: int = 42) -> list[Row]:
    """Every row of a file, parsed (for tests and small files; a job splits and parses in partitions)."""
    return [parse_entry(entry, smiles_seed) for entry in split_entries(Path(path), fmt)]


# values


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _numeric_array(values: list) -> bool:
    try:
        array = np.array(values)
    except Exception:  # noqa: BLE001 - ragged
        return False
    return array.dtype.kind in "fiub" and array.ndim in (1, 2) and len(array) == len(values)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return _plain(value)


def _scalar(value) -> Scalar:
    value = _plain(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    return value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(_jsonable(value))


def _scalars(mapping: dict) -> dict[str, Scalar]:
    return {str(k): _scalar(v) for k, v in mapping.items()}
