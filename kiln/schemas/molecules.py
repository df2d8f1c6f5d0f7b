"""Reading the molecules users send to single points, and their size in a basis (the cost estimate)."""

from __future__ import annotations

import io


class MoleculeError(ValueError):
    """A molecule that cannot be read; the message says what to send instead."""


SEND_INSTEAD = "send XYZ text, a dict {symbols, positions}, a pymatgen Molecule dict, a G2 name such as 'H2O', or SMILES"
# RDKit's 3D embedding is random: a fixed seed makes a SMILES the same molecule every time
SMILES_SEED = 42


def molecule_from_smiles(smiles: str, seed: int = SMILES_SEED):
    """A SMILES string as ASE Atoms: hydrogens added, one 3D conformer embedded (ETKDG, `seed`) and relaxed
    with MMFF94 (UFF where MMFF has no parameters). MoleculeError when RDKit cannot read or embed it."""
    from ase import Atoms

    try:
        from rdkit import Chem, RDLogger
        from rdkit.Chem import AllChem
    except ImportError:  # pragma: no cover - rdkit is one of kiln's dependencies
        raise MoleculeError("molecule: SMILES needs RDKit (pip install rdkit)") from None
    RDLogger.DisableLog("rdApp.*")
    parsed = Chem.MolFromSmiles(smiles.strip())
    if parsed is None or parsed.GetNumAtoms() == 0:
        raise MoleculeError(f"molecule: {smiles.strip()!r} is not a SMILES RDKit can read; {SEND_INSTEAD}")
    mol = Chem.AddHs(parsed)
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    if AllChem.EmbedMolecule(mol, params) != 0:
        raise MoleculeError(f"molecule: RDKit could not embed {smiles.strip()!r} in 3D (seed {seed})")
    if AllChem.MMFFHasAllMoleculeParams(mol):
        AllChem.MMFFOptimizeMolecule(mol, maxIters=500)
    else:
        AllChem.UFFOptimizeMolecule(mol, maxIters=500)
    positions = mol.GetConformer().GetPositions()
    return Atoms(symbols=[atom.GetSymbol() for atom in mol.GetAtoms()], positions=positions)


def parse_molecule(value: str | dict):
    """The molecule as ASE Atoms (no cell, not periodic)."""
    from ase import Atoms

    if isinstance(value, dict):
        if value.get("@class") == "Molecule":
            from pymatgen.core import Molecule
            from pymatgen.io.ase import AseAtomsAdaptor

            try:
                return AseAtomsAdaptor.get_atoms(Molecule.from_dict(value))
            except Exception as exc:  # noqa: BLE001 - pymatgen raises many kinds
                raise MoleculeError(
                    f"molecule: not a readable pymatgen Molecule dict ({exc}); {SEND_INSTEAD}"
                ) from None
        try:
            atoms = Atoms(symbols=value["symbols"], positions=value["positions"])
        except (KeyError, ValueError, TypeError) as exc:
            raise MoleculeError(
                f"molecule: a dict needs `symbols` and `positions` (Å) ({exc}); {SEND_INSTEAD}"
            ) from None
        return atoms
    if not isinstance(value, str) or not value.strip():
        raise MoleculeError(f"molecule: empty; {SEND_INSTEAD}")
    text = value.strip()
    if "\n" in text:
        from ase.io import read

        try:
            atoms = read(io.StringIO(text + "\n"), format="xyz")
        except Exception as exc:  # noqa: BLE001 - ASE's readers raise many kinds
            raise MoleculeError(f"molecule: could not read XYZ text ({exc}); {SEND_INSTEAD}") from None
        atoms.pbc = False
        atoms.cell = None
        return atoms
    from ase.build import molecule
    from ase.collections import g2

    if text in g2.names:
        return molecule(text)
    return molecule_from_smiles(text)


def pyscf_mole(atoms, basis: str, charge: int, multiplicity: int):
    from pyscf import gto

    spec = [(symbol, tuple(position)) for symbol, position in zip(atoms.get_chemical_symbols(), atoms.positions)]
    try:
        return gto.M(atom=spec, basis=basis, charge=charge, spin=multiplicity - 1, unit="Angstrom", verbose=0)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise MoleculeError(
            f"basis/charge/multiplicity: PySCF cannot build {atoms.get_chemical_formula()} in {basis!r} "
            f"with charge {charge} and multiplicity {multiplicity} ({exc})"
        ) from None


def basis_functions(value: str | dict, basis: str, charge: int, multiplicity: int) -> int:
    return int(pyscf_mole(parse_molecule(value), basis, charge, multiplicity).nao_nr())
