"""Energies, forces, stresses, relaxations and formation energies from a loaded matgl Potential.

Pure functions over pymatgen objects: no settings, no Prefect. Every number comes out of matgl's
own code paths (its graph converters, its `Potential.forward`, its ASE calculator), so a result
equals what a scientist gets calling matgl directly.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kiln.errors import InputInvalid

if TYPE_CHECKING:
    from pymatgen.core import Molecule, Structure

# Structures per torch_geometric Batch. Measured on the 2-core machine (torch 2.13.0 CPU, matgl 2.1.2,
# tensornet-matpes-pbe) with 256 cells rattled by 0.05-0.1 Å: NaCl and SrTiO3/BaTiO3 cubic cells,
# Si and primitive Ge, MgO, LiF and CaF2 (2-8 atoms, 1,120 in all). Structures per second through
# predict(), graph building included, best of 4 interleaved runs (single runs scatter by ±20%):
#
#   batch size          1      8     16     32     64    128
#   energy only       207    293    303    303    302    308
#   forces + stress    51     87     88     95     72     24-39
#
# Energy only is flat from 16 on; 64 sits in the plateau with little memory. With forces the
# autograd graph (matgl keeps create_graph=True) grows with the batch and slows beyond 32;
# 8-32 are equal within the scatter, and 16 also keeps progress reports frequent.
DEFAULT_BATCH_SIZE: dict[str, int] = {"energy": 64, "forces": 16}

# what `ml_predict` caches: (model name, element) -> the reference phase's entry, see formation_energy
REFERENCE_CACHE: dict[tuple[str, str], dict[str, Any]] = {}

ProgressCallback = Callable[[int, int], None]


def predict(
    potential: Any,
    structures: Sequence[Structure | Molecule],
    *,
    forces: bool = False,
    stress: bool = False,
    batch_size: int | None = None,
    progress: ProgressCallback | None = None,
) -> list[dict[str, Any]]:
    """Energy (and on request forces and stress) of each structure, in batches through the model.

    Returns one dict per structure, in order:

    - `energy_per_atom` (eV/atom) and `total_energy` (eV): the Potential's energy, element
      reference energies included (the network's raw output, `model.predict_structure`, lacks them);
    - `forces` when asked: n x 3 list, eV/Å;
    - `stress` when asked: 3 x 3 list, GPa, in matgl's and ASE's sign convention,
      sigma = (1/V) dE/d(strain): negative when the cell is compressed (wants to expand),
      pressure = -trace/3. This is what the Potential returns and what `PESCalculator(potential)`
      (its default stress_unit="GPa") reports as `atoms.get_stress(voigt=False)`; VASP prints the
      opposite sign, in kbar. None for a Molecule, which has no cell.

    Structures go through `matgl.ext.pymatgen.Structure2Graph` (`Molecule2Graph` for molecules),
    are joined with `torch_geometric.data.Batch.from_data_list`, and the batch is passed to the
    Potential, which handles batches itself. Against matgl's per-structure answer (PESCalculator)
    energies agree to 1e-6 relative, forces and stresses to float32 rounding (see the unit tests).
    `progress(done, total)` is called after each batch.
    """
    import torch
    from matgl.ext.pymatgen import Molecule2Graph, Structure2Graph
    from pymatgen.core import Molecule
    from torch_geometric.data import Batch

    with_gradients = forces or stress
    batch_size = batch_size or DEFAULT_BATCH_SIZE["forces" if with_gradients else "energy"]
    if batch_size < 1:
        raise InputInvalid(f"batch_size: must be at least 1, not {batch_size}")
    element_types = tuple(potential.model.element_types)
    _check_elements(structures, element_types)

    # The Potential computes forces and stresses by autograd whenever its flags say so; an
    # energy-only run uses a shallow copy with the flags off, sharing the weights and leaving
    # the process-wide Potential untouched for jobs running beside this one.
    runner = potential
    if not with_gradients:
        runner = copy.copy(potential)
        runner.calc_forces = runner.calc_stresses = runner.calc_hessian = False
    cutoff = float(potential.model.cutoff)
    to_graph = {False: Structure2Graph(element_types, cutoff), True: Molecule2Graph(element_types, cutoff)}

    results: list[dict[str, Any]] = []
    total = len(structures)
    for start in range(0, total, batch_size):
        chunk = structures[start : start + batch_size]
        graphs, lattices = [], []
        for item in chunk:
            graph, lattice, _ = to_graph[isinstance(item, Molecule)].get_graph(item)
            graphs.append(graph)
            lattices.append(lattice.reshape(1, 3, 3))
        batch = Batch.from_data_list(graphs)
        with torch.set_grad_enabled(with_gradients):
            energies, atom_forces, stresses, *_ = runner(batch, torch.cat(lattices))
        energies = energies.detach().reshape(-1).tolist()
        if with_gradients:
            atom_forces = atom_forces.detach()
            stresses = stresses.detach().reshape(-1, 3, 3)
        for index, item in enumerate(chunk):
            n_atoms = len(item)
            entry: dict[str, Any] = {"total_energy": energies[index], "energy_per_atom": energies[index] / n_atoms}
            if forces:
                first = int(batch.ptr[index])
                entry["forces"] = atom_forces[first : first + n_atoms].tolist()
            if stress:
                entry["stress"] = None if isinstance(item, Molecule) else stresses[index].tolist()
            results.append(entry)
        if progress is not None:
            progress(len(results), total)
    return results


def relax(
    potential: Any,
    structure: Structure | Molecule,
    *,
    optimizer: str = "FIRE",
    fmax: float = 0.05,
    steps: int = 500,
    relax_cell: bool = True,
) -> dict[str, Any]:
    """Relax atoms (and the cell) with an ASE optimizer on matgl's PESCalculator.

    This is `matgl.ext.ase.Relaxer.relax` (same calculator in eV/Å³, same FrechetCellFilter,
    same optimizer table) unrolled so that the optimizer's own convergence verdict and step count
    come back. `fmax` (eV/Å) bounds the largest force, and with relax_cell the cell's generalised
    forces too. A Molecule keeps its (absent) cell.

    Returns `structure` (the final pymatgen Structure or Molecule as_dict), `energy_per_atom`
    (eV/atom), `total_energy` (eV), `steps` (optimizer steps taken; the trajectory holds
    steps + 1 frames) and `converged`.
    """
    from ase.filters import FrechetCellFilter
    from matgl.ext.ase import OPTIMIZERS, PESCalculator
    from pymatgen.core import Molecule
    from pymatgen.io.ase import AseAtomsAdaptor

    try:
        optimizer_class = OPTIMIZERS[optimizer.lower()].value
    except KeyError:
        names = ", ".join(member.value.__name__ for member in OPTIMIZERS)
        raise InputInvalid(f"relax.optimizer: unknown optimizer {optimizer!r}; choose one of {names}") from None
    periodic = not isinstance(structure, Molecule)
    atoms = AseAtomsAdaptor.get_atoms(structure)
    atoms.calc = PESCalculator(potential, stress_unit="eV/A3")
    moving = FrechetCellFilter(atoms) if relax_cell and periodic else atoms
    run = optimizer_class(moving, logfile=None)
    converged = bool(run.run(fmax=fmax, steps=steps))
    total_energy = float(atoms.get_potential_energy())

    final = atoms.copy()  # without the calculator, whose results would ride along into the dict
    adaptor = AseAtomsAdaptor()
    final_structure = adaptor.get_structure(final) if periodic else adaptor.get_molecule(final)
    return {
        "structure": final_structure.as_dict(),
        "energy_per_atom": total_energy / len(atoms),
        "total_energy": total_energy,
        "steps": int(run.nsteps),
        "converged": converged,
    }


# Elemental reference phases for formation energies, each relaxed with the same potential.
#
# Solids are the 0 K ground-state structures (as in the Materials Project), started from
# experimental lattice parameters and relaxed with their cell. Elements that are gases or
# molecular solids (H, N, O, F, Cl, Br, I; S as S8 rings) are taken as the isolated molecule in
# a 15 Å box, which the 5 Å cutoff makes exactly an isolated molecule: in PBE without dispersion
# the molecular crystals MP uses (e.g. alpha-O2, solid Cl2) bind their molecules by a few tens of
# meV/atom at most, within the model's own error, and a molecule needs no guess at a
# crystal the model saw little of. The molecule's spin state is whatever the model learned (the
# network has no spin input). Elements missing here (noble gases, B, lanthanides, actinides,
# ...) are refused rather than guessed.
_FCC = {"Al": 4.05, "Ca": 5.58, "Sr": 6.08, "Ni": 3.52, "Cu": 3.61, "Rh": 3.80, "Pd": 3.89, "Ag": 4.09,
        "Ir": 3.84, "Pt": 3.92, "Au": 4.08, "Pb": 4.95}  # fmt: skip
_BCC = {"Li": 3.44, "Na": 4.23, "K": 5.23, "Rb": 5.59, "Cs": 6.05, "Ba": 5.02, "V": 3.03, "Cr": 2.91,
        "Fe": 2.87, "Nb": 3.30, "Mo": 3.15, "Ta": 3.30, "W": 3.16}  # fmt: skip
_HCP = {"Be": (2.29, 3.58), "Mg": (3.21, 5.21), "Sc": (3.31, 5.27), "Ti": (2.95, 4.68), "Co": (2.51, 4.07),
        "Zn": (2.66, 4.95), "Y": (3.65, 5.73), "Zr": (3.23, 5.15), "Tc": (2.74, 4.40), "Ru": (2.71, 4.28),
        "Cd": (2.98, 5.62), "Hf": (3.20, 5.05), "Re": (2.76, 4.46), "Os": (2.73, 4.32), "Tl": (3.46, 5.52)}  # fmt: skip
_DIAMOND = {"Si": 5.43, "Ge": 5.66, "Sn": 6.49}  # Sn: alpha-Sn, the 0 K phase
_DIMER = {"H": 0.74, "N": 1.10, "O": 1.21, "F": 1.42, "Cl": 1.99, "Br": 2.28, "I": 2.67}  # bond length, Å
# A7 (R-3m, hexagonal setting): a, c, z of the 6c site
_A7 = {"As": (3.76, 10.55, 0.227), "Sb": (4.31, 11.27, 0.2336), "Bi": (4.55, 11.86, 0.2339)}
# trigonal chains (P3_121): a, c, x of the 3a site
_CHAINS = {"Se": (4.366, 4.954, 0.2254), "Te": (4.457, 5.929, 0.2636)}
_BOX = 15.0


def _reference_phase(element: str) -> tuple[str, Structure, bool]:
    """(description, starting structure, relax the cell?) of the element's reference phase."""
    from pymatgen.core import Lattice, Structure

    if element in _FCC:
        return "fcc", Structure.from_spacegroup("Fm-3m", Lattice.cubic(_FCC[element]), [element], [[0, 0, 0]]), True
    if element in _BCC:
        return "bcc", Structure.from_spacegroup("Im-3m", Lattice.cubic(_BCC[element]), [element], [[0, 0, 0]]), True
    if element in _HCP:
        a, c = _HCP[element]
        lattice = Lattice.hexagonal(a, c)
        return "hcp", Structure.from_spacegroup("P6_3/mmc", lattice, [element], [[1 / 3, 2 / 3, 1 / 4]]), True
    if element in _DIAMOND:
        lattice = Lattice.cubic(_DIAMOND[element])
        return "diamond", Structure.from_spacegroup("Fd-3m", lattice, [element], [[0, 0, 0]]), True
    if element == "C":
        # graphite (AB), MP's ground state; PBE barely binds the layers, so c relaxes loosely
        lattice = Lattice.hexagonal(2.46, 6.71)
        coords = [[0, 0, 1 / 4], [1 / 3, 2 / 3, 1 / 4]]
        return "graphite", Structure.from_spacegroup("P6_3/mmc", lattice, ["C", "C"], coords), True
    if element in _A7:
        a, c, z = _A7[element]
        lattice = Lattice.hexagonal(a, c)
        return "A7 (R-3m)", Structure.from_spacegroup("R-3m", lattice, [element], [[0, 0, z]]), True
    if element in _CHAINS:
        a, c, x = _CHAINS[element]
        lattice = Lattice.hexagonal(a, c)
        return "trigonal chains (P3_121)", Structure.from_spacegroup(152, lattice, [element], [[x, 0, 1 / 3]]), True
    if element == "P":
        lattice = Lattice.orthorhombic(3.314, 10.48, 4.376)
        return "black P (Cmce)", Structure.from_spacegroup("Cmce", lattice, ["P"], [[0, 0.1017, 0.0806]]), True
    if element == "Ga":
        lattice = Lattice.orthorhombic(4.52, 7.66, 4.53)
        return "alpha-Ga (Cmce)", Structure.from_spacegroup("Cmce", lattice, ["Ga"], [[0, 0.1549, 0.0810]]), True
    if element == "In":
        lattice = Lattice.tetragonal(3.25, 4.95)
        return "body-centred tetragonal", Structure.from_spacegroup("I4/mmm", lattice, ["In"], [[0, 0, 0]]), True
    if element == "Hg":
        lattice = Lattice.hexagonal(3.47, 6.72)
        return "alpha-Hg (R-3m)", Structure.from_spacegroup("R-3m", lattice, ["Hg"], [[0, 0, 0]]), True
    if element == "Mn":
        coords = [[0, 0, 0], [0.317, 0.317, 0.317], [0.357, 0.357, 0.034], [0.089, 0.089, 0.282]]
        alpha_mn = Structure.from_spacegroup("I-43m", Lattice.cubic(8.91), ["Mn"] * 4, coords)
        return "alpha-Mn (I-43m), non-magnetic", alpha_mn.get_primitive_structure(), True
    lattice = Lattice.cubic(_BOX)
    centre = _BOX / 2
    if element in _DIMER:
        half = _DIMER[element] / 2
        coords = [[centre, centre, centre - half], [centre, centre, centre + half]]
        box = Structure(lattice, [element] * 2, coords, coords_are_cartesian=True)
        return f"{element}2 molecule in a {_BOX:g} Å box", box, False
    if element == "S":
        # crown S8 ring (D4d): S-S 2.05 Å, S-S-S 108°, the molecule alpha-S is made of
        radius, height = 2.3455, 0.4950
        coords = [
            [centre + radius * math.cos(k * math.pi / 4), centre + radius * math.sin(k * math.pi / 4),
             centre + (height if k % 2 == 0 else -height)]
            for k in range(8)
        ]  # fmt: skip
        box = Structure(lattice, ["S"] * 8, coords, coords_are_cartesian=True)
        return f"S8 ring in a {_BOX:g} Å box", box, False
    raise InputInvalid(
        f"structure: no reference phase for {element} in kiln's table, so its formation energy cannot be "
        f"computed; elements with one: {', '.join(sorted(REFERENCE_ELEMENTS))}"
    )


REFERENCE_ELEMENTS = frozenset(
    [*_FCC, *_BCC, *_HCP, *_DIAMOND, *_DIMER, *_A7, *_CHAINS, "C", "P", "Ga", "In", "Hg", "Mn", "S"]
)


def reference_energy(
    potential: Any, element: str, model_name: str, reference_cache: dict[tuple[str, str], dict[str, Any]]
) -> dict[str, Any]:
    """The element's reference phase relaxed with `potential`: its energy per atom, cached per (model, element)."""
    key = (model_name, element)
    if key not in reference_cache:
        phase, start, relax_cell = _reference_phase(element)
        relaxed = relax(potential, start, fmax=0.01, steps=1000, relax_cell=relax_cell)
        reference_cache[key] = {
            "phase": phase,
            "energy_per_atom": relaxed["energy_per_atom"],
            "how": f"relaxed with {model_name}" + ("" if relaxed["converged"] else " (not converged in 1000 steps)"),
        }
    return reference_cache[key]


def formation_energy(
    potential: Any,
    structure: Structure,
    model_name: str,
    reference_cache: dict[tuple[str, str], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Formation energy (eV/atom) of `structure`, as given, from its elements' reference phases.

    E_f = (E(structure) - sum_i n_i mu_i) / N, with every energy from the same potential: mu_i is
    the energy per atom of element i's reference phase relaxed with it (see `_reference_phase`),
    computed once per (model, element) and kept in `reference_cache` (REFERENCE_CACHE by default).
    The structure is not relaxed here: relax it first for a ground-state formation energy.

    The potential reproduces raw PBE energies (MatPES-PBE, no anion corrections). Databases
    that correct PBE towards experiment (Materials Project's MP2020 scheme, OQMD's fitted chemical
    potentials) report oxides, chalcogenides, halides and nitrides several tenths of an eV/atom
    more negative; PBE's overbinding of O2 alone makes oxides ~0.34 eV per O atom too weakly bound
    (MP2020 corrects -0.687 eV/O). Compare these numbers with uncorrected PBE values, not with
    corrected ones or experiment; for transition-metal oxides MP's GGA/GGA+U mixing differs too.
    """
    from pymatgen.core import Molecule

    if isinstance(structure, Molecule):
        raise InputInvalid("structure: a formation energy needs a periodic crystal, not a molecule")
    cache = REFERENCE_CACHE if reference_cache is None else reference_cache
    amounts = structure.composition.element_composition.get_el_amt_dict()
    references = {el: reference_energy(potential, el, model_name, cache) for el in sorted(amounts)}
    (energy,) = predict(potential, [structure])
    reference_total = sum(n * references[el]["energy_per_atom"] for el, n in amounts.items())
    return {
        "formation_energy": (energy["total_energy"] - reference_total) / len(structure),
        "unit": "eV/atom",
        "references": references,
    }


def check_elements(potential: Any, structures: Sequence[Structure | Molecule]) -> None:
    """Refuses, naming the structure by its index, a disordered structure or an element the model does not know."""
    _check_elements(structures, tuple(potential.model.element_types))


def _check_elements(structures: Sequence[Structure | Molecule], element_types: tuple[str, ...]) -> None:
    known = set(element_types)
    for index, item in enumerate(structures):
        if not item.is_ordered:
            raise InputInvalid(
                f"structures.{index}: has sites with partial occupancy; the model needs an ordered structure "
                "(order it first, e.g. with pymatgen's OrderDisorderedStructureTransformation)"
            )
        unknown = sorted({site.specie.symbol for site in item} - known)
        if unknown:
            raise InputInvalid(
                f"structures.{index}: the model was not trained on {', '.join(unknown)}; "
                f"it knows {len(known)} elements, {element_types[0]} to {element_types[-1]}"
            )
