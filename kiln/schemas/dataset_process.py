"""The dataset_process job's input: a dataset of structures (uploads, or an earlier job's files) and its pipeline.

Steps run in order on every row: `convert`, `filter`, `featurize`, `validate`. A row that fails a step
goes to the errors table (row_id, step, error_type, message) and, by the step's `policy`, ends the job
(`fail`), leaves the output (`drop`), or leaves it for the quarantine table (`quarantine`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kiln.schemas.files import InputFile

INPUT_FORMATS = ("auto", "cif", "poscar", "extxyz", "json", "parquet", "ase-db", "smiles")
OUTPUT_FORMATS = ("parquet", "extxyz", "json", "cif-zip", "poscar-zip", "ase-db")
InputFormat = Literal["auto", "cif", "poscar", "extxyz", "json", "parquet", "ase-db", "smiles"]
OutputFormat = Literal["parquet", "extxyz", "json", "cif-zip", "poscar-zip", "ase-db"]
Policy = Literal["fail", "drop", "quarantine"]

# matminer featurizers a job may name: name -> (module, what it reads, its presets). What it reads is the
# row's structure or its composition; a preset is `from_preset(name)`, none is the class's defaults.
FEATURIZERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "ElementProperty": ("matminer.featurizers.composition", "composition",
                        ("magpie", "deml", "matminer", "matscholar_el", "megnet_el")),
    "Stoichiometry": ("matminer.featurizers.composition", "composition", ()),
    "ValenceOrbital": ("matminer.featurizers.composition", "composition", ()),
    "ElementFraction": ("matminer.featurizers.composition", "composition", ()),
    "BandCenter": ("matminer.featurizers.composition", "composition", ()),
    "IonProperty": ("matminer.featurizers.composition", "composition", ()),
    "DensityFeatures": ("matminer.featurizers.structure", "structure", ()),
    "GlobalSymmetryFeatures": ("matminer.featurizers.structure", "structure", ()),
    "StructuralComplexity": ("matminer.featurizers.structure", "structure", ()),
    "MaximumPackingEfficiency": ("matminer.featurizers.structure", "structure", ()),
    "ChemicalOrdering": ("matminer.featurizers.structure", "structure", ()),
}  # fmt: skip
# kiln's own featurizer: energies from a kiln ML model (GET /api/v1/models), batched through the warm model
ML_ENERGY = "ml_energy"
FeaturizerName = Literal[
    "ElementProperty", "Stoichiometry", "ValenceOrbital", "ElementFraction", "BandCenter", "IonProperty",
    "DensityFeatures", "GlobalSymmetryFeatures", "StructuralComplexity", "MaximumPackingEfficiency",
    "ChemicalOrdering", "ml_energy",
]  # fmt: skip

# pandera's built-in checks a schema's column may name, with what its argument is: one value, or keywords
PANDERA_CHECKS = ("eq", "ne", "gt", "ge", "lt", "le", "in_range", "isin", "notin", "str_matches", "str_contains",
                  "str_startswith", "str_endswith", "str_length")  # fmt: skip
PANDERA_DTYPES = ("float", "float64", "int", "int64", "str", "bool")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class DatasetSource(_Strict):
    """Where the rows come from: uploads (`file`, `files`), or the files an earlier job of the project produced."""

    files: list[InputFile] | None = Field(
        None, min_length=1, max_length=10000,
        description="Files uploaded with POST /api/v1/files (names or sha256): a folder of CIFs is many files. "
        "`{\"file\": NAME}` is the same as `{\"files\": [NAME]}`. Pinned at submission to the uploads' contents.",
    )  # fmt: skip
    job: str | None = Field(
        None, min_length=1, max_length=64,
        description="An earlier job of this project whose files are the dataset (a dataset_process job's output, "
        "a plugin's /out): every file of it but an errors or quarantine table. It must have completed; its files are "
        "pinned at submission into `files`.",
    )  # fmt: skip

    @model_validator(mode="before")
    @classmethod
    def _one_file_is_a_list_of_one(cls, data: Any) -> Any:
        if isinstance(data, dict) and "file" in data:
            data = dict(data)
            if "files" in data:
                raise ValueError("give `file` or `files`, not both")
            data["files"] = [data.pop("file")]
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> DatasetSource:
        if self.files is None and self.job is None:
            raise ValueError("name the dataset: {\"file\": NAME}, {\"files\": [NAME, …]} or {\"job\": ID}")
        if self.job is not None and any(isinstance(item, str) for item in self.files or ()):
            raise ValueError("give uploads (`file`, `files`) or an earlier `job`, not both")
        return self


class Range(_Strict):
    """Bounds, both inclusive; an absent one is open."""

    min: float | None = Field(None, description="The least value kept.")
    max: float | None = Field(None, description="The largest value kept.")


class ConvertStep(_Strict):
    step: Literal["convert"] = Field(description="Transforms every structure; it stays a structure.")
    to: Literal["primitive", "conventional", "niggli", "sorted", "oxidation_states"] = Field(
        description="primitive / conventional standard cell (spglib), Niggli-reduced cell, sites sorted by "
        "electronegativity, or oxidation states guessed by bond valence (pymatgen's BVAnalyzer).",
    )
    policy: Policy = Field("drop", description="What a row that cannot be converted does.")


class FilterStep(_Strict):
    step: Literal["filter"] = Field(description="Keeps the rows that pass every condition given.")
    elements_include: list[str] | None = Field(None, description="Keep rows holding every one of these elements.")
    elements_exclude: list[str] | None = Field(None, description="Drop rows holding any of these elements.")
    nsites: Range | None = Field(None, description="Number of sites.")
    volume_per_atom: Range | None = Field(None, description="Cell volume per site, Å³.")
    density: Range | None = Field(None, description="Density, g/cm³.")
    formula: str | None = Field(
        None, max_length=200, description="A regular expression the reduced formula must match in full (e.g. 'Li.*O\\d*').")
    in_domain: str | None = Field(
        None, description="A kiln ML model (GET /api/v1/models): keep rows whose elements it was trained on and whose "
        "bonds are not squeezed (ml_predict's `in_domain`).",
    )  # fmt: skip
    duplicates: bool = Field(
        False, description="Drop a row whose structure pymatgen's StructureMatcher matches to an earlier row's: within "
        "its partition as the step runs, then across partitions once all are done.",
    )  # fmt: skip
    policy: Policy = Field("drop", description="What a row the conditions cannot be evaluated on does (a molecule "
                           "has no volume): rows that merely fail a condition are filtered out, not errors.")  # fmt: skip

    @field_validator("formula")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        import re

        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression ({exc})") from None
        return value

    @field_validator("elements_include", "elements_exclude")
    @classmethod
    def _elements(cls, value: list[str] | None) -> list[str] | None:
        from pymatgen.core.periodic_table import Element

        for symbol in value or []:
            if not Element.is_valid_symbol(symbol):
                raise ValueError(f"{symbol!r} is not an element symbol")
        return value


class Featurizer(_Strict):
    name: FeaturizerName = Field(description="A matminer featurizer, or `ml_energy` (a kiln ML model's energy).")
    preset: str | None = Field(None, description="The featurizer's preset (ElementProperty: magpie, deml, …).")
    model: str | None = Field(None, description="ml_energy only: the kiln ML model (GET /api/v1/models).")

    @model_validator(mode="after")
    def _fits(self) -> Featurizer:
        if self.name == ML_ENERGY:
            if self.preset is not None:
                raise ValueError("ml_energy takes a `model`, not a preset")
            if self.model is None:
                self.model = "tensornet-matpes-pbe"
            return self
        if self.model is not None:
            raise ValueError(f"{self.name} takes no model; only ml_energy does")
        presets = FEATURIZERS[self.name][2]
        if self.preset is not None and self.preset not in presets:
            known = ", ".join(presets) or "none"
            raise ValueError(f"{self.name} has no preset {self.preset!r}; its presets: {known}")
        return self


class FeaturizeStep(_Strict):
    step: Literal["featurize"] = Field(description="Adds feature columns, named as matminer names them.")
    featurizers: list[Featurizer] = Field(min_length=1, max_length=50, description="The featurizers, in order.")
    policy: Policy = Field("drop", description="What a row a featurizer fails on does.")


class ColumnRule(_Strict):
    """A column's rules, as pandera's Column takes them."""

    dtype: Literal["float", "float64", "int", "int64", "str", "bool"] | None = Field(
        None, description="The column's type; values are not coerced.")
    nullable: bool = Field(False, description="Whether missing values (null, NaN) pass.")
    unique: bool = Field(False, description="Whether every value must differ, over the whole dataset.")
    required: bool = Field(True, description="Whether the column must exist; a missing required column fails the job.")
    checks: dict[str, Any] = Field(
        default_factory=dict,
        description="pandera built-in checks by name with their argument: a value (`{\"ge\": 0}`), a list for "
        "isin/notin, or keywords (`{\"in_range\": {\"min_value\": 0, \"max_value\": 30}}`). Names: "
        + ", ".join(PANDERA_CHECKS) + ".",
    )  # fmt: skip

    @field_validator("checks")
    @classmethod
    def _known_checks(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(PANDERA_CHECKS))
        if unknown:
            raise ValueError(f"unknown pandera check {unknown[0]!r}; known: {', '.join(PANDERA_CHECKS)}")
        return value


class PanderaSchema(_Strict):
    """A pandera DataFrameSchema written as JSON: rules per column."""

    columns: dict[str, ColumnRule] = Field(min_length=1, description="Rules by column name.")
    strict: bool = Field(False, description="Whether columns the schema does not name fail the job.")


class ValidateStep(_Strict):
    step: Literal["validate"] = Field(description="Checks every row; a row that breaks a rule fails this step.")
    pandera_schema: PanderaSchema | None = Field(
        None, alias="schema", description="A pandera schema over the row's columns (its features and properties).")
    min_distance: float | None = Field(
        0.5, ge=0, description="Atoms closer than this (Å, periodic images included) fail the row; null: no check.")
    charge_balance: bool = Field(
        False, description="Fail a row whose oxidation states (given, or guessed from common ones) do not sum to zero; "
        "rows of metals only, or whose states cannot be guessed, pass.",
    )  # fmt: skip
    policy: Policy = Field("quarantine", description="What a row that fails validation does.")

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True, serialize_by_alias=True)


Step = Annotated[ConvertStep | FilterStep | FeaturizeStep | ValidateStep, Field(discriminator="step")]


class DatasetProcessInput(_Strict):
    source: DatasetSource = Field(description="The dataset: `{\"file\"}`, `{\"files\"}` (uploads) or `{\"job\"}`.")
    format: InputFormat = Field(
        "auto", description="The files' format; auto: by each file's name, else by its content. A .zip is read member "
        "by member.",
    )  # fmt: skip
    steps: list[Step] = Field(default_factory=list, max_length=50, description="The pipeline, run in order on each row.")
    output_format: OutputFormat = Field("parquet", description="The format of the output dataset (a job file).")
    partition_rows: int = Field(
        1000, ge=1, le=1_000_000,
        description="Rows per partition: a partition is one Prefect task on the worker's Dask cluster, and what a "
        "retry after a worker's death resumes from.",
    )  # fmt: skip
    on_read_error: Policy = Field("drop", description="What a row that cannot be read (an unparseable entry) does.")
    smiles_seed: int = Field(42, description="The seed of RDKit's 3D embedding of SMILES rows.")

    def ml_models(self) -> list[str]:
        """The kiln ML models the pipeline names (featurize ml_energy, filter in_domain)."""
        models = []
        for step in self.steps:
            if isinstance(step, FeaturizeStep):
                models += [f.model for f in step.featurizers if f.name == ML_ENERGY]
            if isinstance(step, FilterStep) and step.in_domain:
                models.append(step.in_domain)
        return sorted(set(models))

    def estimated_hours(self) -> float:
        """A dataset job is priced at an hour until it is read; most take seconds."""
        return 1.0
