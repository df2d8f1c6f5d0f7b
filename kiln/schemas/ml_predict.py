"""Input of the `ml_predict` job: properties of crystal structures from a machine-learned interatomic potential."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kiln.schemas.structures import MAX_ATOMS, ParsedStructure, parse_structure


def _readable(value: str | dict | None, info: ValidationInfo) -> str | dict | None:
    """Fails validation with parse_structure's message, keeping the value as sent (the input is stored as JSON).

    What was read is kept in the validation context's "parsed" list, when there is one (`MLPredictInput.read`).
    """
    if value is not None:
        parsed = parse_structure(value, check=not (info.context or {}).get("checked"))
        if info.context is not None:
            info.context["parsed"].append(parsed)
    return value


def _canonical_structure(structure) -> dict:
    """Lattice vectors and (species, fractional coordinates in [0, 1)) sorted, to 1e-6: CIF, POSCAR and a
    pymatgen dict of one crystal agree, whatever their site order, labels or float formatting."""
    def wrapped(x: float) -> float:
        value = round(x % 1.0, 6)
        return 0.0 if value == 1.0 else value

    # the coordinates as one list of floats: a numpy scalar's arithmetic, site by site, took 4x as long
    coordinates = ([wrapped(x) for x in row] for row in structure.frac_coords.tolist())
    sites = sorted(zip((site.species_string for site in structure), coordinates))
    return {"lattice": [[round(x, 6) for x in row] for row in structure.lattice.matrix.tolist()], "sites": sites}


# Most structures one job takes; more belong in several jobs.
MAX_STRUCTURES = 10000

StructureValue = Annotated[str | dict, AfterValidator(_readable)]

STRUCTURE_FORMS = (
    "CIF text, POSCAR text, extended XYZ text with a Lattice=, a pymatgen Structure.as_dict(), an ASE-style dict "
    "(numbers or symbols, positions, cell, pbc), or a bare formula with a built-in prototype (e.g. 'NaCl', "
    f"'BaTiO3', 'Si'); periodic, at most {MAX_ATOMS} atoms"
)


class RelaxOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    optimizer: Literal["FIRE", "BFGS", "LBFGS"] = Field("FIRE", description="ASE optimizer for the relaxation.")
    fmax: float = Field(0.05, gt=0, description="Relaxation stops when every force is below this (eV/Å).")
    steps: int = Field(500, ge=1, le=10000, description="Most optimizer steps per structure.")
    relax_cell: bool = Field(True, description="Relax the cell shape and volume as well as the atom positions.")


class MLPredictInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "tensornet-matpes-pbe", description="Name of the kiln ML model to predict with (GET /api/v1/models lists them)."
    )
    structure: Annotated[str | dict | None, AfterValidator(_readable)] = Field(
        None, description=f"One structure: {STRUCTURE_FORMS}. Give this or `structures`."
    )
    structures: list[StructureValue] | None = Field(
        None,
        min_length=1,
        max_length=MAX_STRUCTURES,
        description=f"Up to {MAX_STRUCTURES} structures, each as for `structure`. Give this or `structure`.",
    )
    property: Literal["energy", "forces", "stress", "relax", "formation_energy"] = Field(
        "energy",
        description=(
            "What to predict: energy (eV and eV/atom), forces (eV/Å, with the energy), stress (GPa, with the "
            "energy), relax (relaxed structure and its energy) or formation_energy (eV/atom from elemental "
            "references computed with the same model)."
        ),
    )
    relax: RelaxOptions = Field(
        default_factory=RelaxOptions, description="How to relax, when `property` is relax or formation_energy."
    )
    batch_size: int | None = Field(
        None, ge=1, le=1024, description="Structures per model call; None uses the tuned default."
    )

    _parsed: list[ParsedStructure] | None = PrivateAttr(None)

    @field_validator("structures", mode="before")
    @classmethod
    def _not_too_many(cls, value: object) -> object:
        # before the items are parsed, so an oversized list is refused without reading 10000 structures
        if isinstance(value, list) and len(value) > MAX_STRUCTURES:
            raise ValueError(f"at most {MAX_STRUCTURES} structures per job, not {len(value)}; split them into jobs")
        return value

    @model_validator(mode="after")
    def _one_of_structure_or_structures(self) -> MLPredictInput:
        if (self.structure is None) == (self.structures is None):
            got = "both" if self.structure is not None else "neither"
            raise ValueError(
                f"give exactly one of `structure` (one structure) or `structures` (a list of them); got {got}"
            )
        return self

    @classmethod
    def read(cls, data: dict | str, checked: bool = False) -> MLPredictInput:
        """The validated input with its structures read once, for the job that runs it; JSON text is read
        strictly (no coercion of JSON types), as the API takes it. `checked`: an input kiln took (and checked)
        already, read back in the worker: its structures are read, not checked again (a tenth of a second for
        1000 structures)."""
        context: dict = {"parsed": [], "checked": checked}
        if isinstance(data, str):
            request = cls.model_validate_json(data, strict=True, context=context)
        else:
            request = cls.model_validate(data, context=context)
        request._parsed = context["parsed"]
        return request

    def canonical(self) -> dict:
        """The input as the cache compares it: each structure as its lattice and sorted sites, whatever form
        it came in (the model's version joins it through the job type's `versions`)."""
        data = self.model_dump(mode="json", exclude={"structure", "structures"})
        # a formula's prototype is relaxed before predicting: not the same calculation as that structure sent
        structures = [{**_canonical_structure(item.structure), "prototype": item.prototype} for item in self.parsed()]
        data["structure" if self.structure is not None else "structures"] = (
            structures[0] if self.structure is not None else structures
        )
        return data

    def parsed(self) -> list[ParsedStructure]:
        """The structures read into pymatgen, in the order sent (one for `structure`)."""
        if self._parsed is None:
            values = [self.structure] if self.structure is not None else self.structures
            self._parsed = [parse_structure(value) for value in values]
        return self._parsed
