"""Molecules' energies for single points, from GFN2-xTB (tblite) or DFT/HF (PySCF)."""

from __future__ import annotations

import time
from typing import Any

from kiln.schemas.molecules import parse_molecule, pyscf_mole

HARTREE_EV = 27.211386245988  # CODATA 2018, as ASE's units.Hartree


def single_point(value: str | dict, method: str, basis: str, charge: int, multiplicity: int) -> dict[str, Any]:
    """The molecule's total energy at the level of theory, in Hartree and eV, with what was computed."""
    atoms = parse_molecule(value)
    started = time.perf_counter()
    if method == "GFN2-xTB":
        from tblite.interface import Calculator

        from ase.units import Bohr

        calculator = Calculator("GFN2-xTB", atoms.numbers, atoms.positions / Bohr, charge=charge,
                                uhf=multiplicity - 1)
        calculator.set("verbosity", 0)
        result = calculator.singlepoint()
        energy = float(result.get("energy"))
        details = {"program": "tblite", "converged": True}
    else:
        from pyscf import dft, scf

        mol = pyscf_mole(atoms, basis, charge, multiplicity)
        if method == "HF":
            mf = scf.RHF(mol) if multiplicity == 1 else scf.UHF(mol)
        else:
            mf = dft.RKS(mol) if multiplicity == 1 else dft.UKS(mol)
            mf.xc = method
        energy = float(mf.kernel())
        details = {"program": "pyscf", "converged": bool(mf.converged), "basis": basis,
                   "basis_functions": int(mol.nao_nr())}
        if not mf.converged:
            raise RuntimeError(f"the {method}/{basis} SCF of {atoms.get_chemical_formula()} did not converge")
    return {
        "energy": energy,
        "energy_unit": "Hartree",
        "energy_eV": energy * HARTREE_EV,
        "method": method,
        "formula": atoms.get_chemical_formula(),
        "charge": charge,
        "multiplicity": multiplicity,
        **details,
        "timings": {"single_point_s": round(time.perf_counter() - started, 4)},
    }
