"""Input of the `simulation` job: relax or MD with a matgl potential, or a molecular single point."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from kiln.schemas.ml_predict import STRUCTURE_FORMS, RelaxOptions
from kiln.schemas.structures import MAX_ATOMS, parse_structure

# Cost of a run, in atom-steps (atoms × steps × replicas; a single point counts as one step per atom
# for xTB and as basis functions³/10⁴ for DFT). On the 2-core development machine the TensorNet
# potential took 0.16-0.3 s per MD step of a 64-atom cell with one torch thread (about 3 ms per
# atom-step), so the threshold below is about 10 minutes of local work. A job without a
# compute_target that costs more goes to the cluster KILN_SIMULATION_CLUSTER names, as an
# hpc_submit child job; compute_target='local' keeps it local, a cluster name always sends it there.
LOCAL_COST_LIMIT = 200_000
MAX_REPLICAS = 256


def _crystal(value: str | dict | None) -> str | dict | None:
    if value is not None:
        parse_structure(value)
    return value


def _molecule(value: str | dict | None) -> str | dict | None:
    if value is not None:
        from kiln.schemas.molecules import parse_molecule

        parse_molecule(value)
    return value


class MDOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ensemble: Literal["NVE", "NVT", "NPT"] = Field(
        "NVT",
        description="NVE (velocity Verlet), NVT (Langevin thermostat) or NPT (Berendsen thermostat and barostat).",
    )
    temperature_K: float = Field(300, gt=0, le=5000, description="Temperature (K): initial velocities and thermostat.")
    timestep_fs: float = Field(1.0, gt=0, le=10, description="Integration timestep (fs).")
    steps: int = Field(100, ge=1, le=1_000_000, description="MD steps per replica.")
    pressure_GPa: float = Field(0.0001, ge=-10, le=1000, description="Pressure (GPa) for NPT; 1 bar by default.")
    friction_per_fs: float = Field(0.01, gt=0, le=1, description="Langevin friction (1/fs) for NVT.")
    sample_interval: int = Field(10, ge=1, description="Energies are recorded every this many steps.")
    trajectory_interval: int = Field(
        10, ge=1, description="A frame is written to the trajectory every this many steps."
    )
    seed: int = Field(0, description="Seed of the initial velocities (and Langevin noise); replica i uses seed + i.")


class SimulationInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    calculation: Literal["relax", "md", "single_point"] = Field(
        description="relax or md of a crystal with a matgl potential; single_point of a molecule with xTB or DFT."
    )
    structure: Annotated[str | dict | None, AfterValidator(_crystal)] = Field(
        None, description=f"The crystal for relax and md: {STRUCTURE_FORMS}."
    )
    supercell: tuple[int, int, int] | None = Field(
        None, description="Repeat the structure this many times along a, b, c first (e.g. [2, 2, 2])."
    )
    molecule: Annotated[str | dict | None, AfterValidator(_molecule)] = Field(
        None,
        description=(
            "The molecule for single_point: XYZ text, a dict {symbols, positions (Å)}, a pymatgen Molecule dict, "
            "a name from ASE's G2 set (e.g. 'H2O', 'CH4'), or SMILES (e.g. 'CCO'; hydrogens added, a 3D conformer "
            "embedded by RDKit with a fixed seed and relaxed with MMFF94). A G2 name wins over the same SMILES."
        ),
    )
    model: str = Field("tensornet-matpes-pbe", description="The kiln ML model (GET /api/v1/models) for relax and md.")
    method: Literal["GFN2-xTB", "PBE", "B3LYP", "HF"] = Field(
        "GFN2-xTB", description="Level of theory of a single_point: GFN2-xTB (tblite) or DFT/HF (PySCF)."
    )
    basis: str = Field("def2-SVP", description="Basis set of a PySCF single point.")
    charge: int = Field(0, ge=-10, le=10, description="Total charge of the molecule.")
    multiplicity: int = Field(1, ge=1, le=10, description="Spin multiplicity (2S+1) of the molecule.")
    relax: RelaxOptions = Field(default_factory=RelaxOptions, description="How to relax, for calculation=relax.")
    md: MDOptions = Field(default_factory=MDOptions, description="The MD run, for calculation=md.")
    ntasks: int = Field(
        1, ge=1, le=MAX_REPLICAS, description="Independent MD replicas (seeds seed+i), merged into mean and spread."
    )

    @model_validator(mode="after")
    def _consistent(self) -> SimulationInput:
        if self.calculation == "single_point":
            if self.molecule is None or self.structure is not None:
                raise ValueError("a single_point takes `molecule` (not `structure`)")
        elif self.structure is None or self.molecule is not None:
            raise ValueError(f"a {self.calculation} takes `structure` (a crystal), not `molecule`")
        if self.ntasks > 1 and self.calculation != "md":
            raise ValueError("ntasks: only md splits into replicas; run other calculations as separate jobs")
        if self.calculation != "single_point" and self.atoms() > MAX_ATOMS:
            raise ValueError(f"supercell: {self.atoms()} atoms, more than the {MAX_ATOMS} one job takes")
        return self

    def atoms(self) -> int:
        if self.calculation == "single_point":
            from kiln.schemas.molecules import parse_molecule

            return len(parse_molecule(self.molecule))
        sites = len(parse_structure(self.structure).structure)
        a, b, c = self.supercell or (1, 1, 1)
        return sites * a * b * c

    def cost(self) -> int:
        """The run's cost in atom-steps, compared with LOCAL_COST_LIMIT (see there)."""
        atoms = self.atoms()
        if self.calculation == "md":
            return atoms * self.md.steps * self.ntasks
        if self.calculation == "relax":
            return atoms * self.relax.steps
        if self.method == "GFN2-xTB":
            return atoms
        from kiln.schemas.molecules import basis_functions

        return basis_functions(self.molecule, self.basis, self.charge, self.multiplicity) ** 3 // 10_000
