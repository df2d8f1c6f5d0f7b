"""The pipeline's steps over the rows of one partition, with per-row errors as data; no Prefect here.

`run_partition` reads a partition's entries and runs the steps in order. A row a step cannot handle becomes
an error (row_id, step, step_index, error_type, message) and leaves the rows by the step's policy: `drop`,
`quarantine` (kept, with its error, for the quarantine table) or `fail` (PipelineFailed: the job ends failed,
naming the row and the step). A row that merely does not pass a filter is filtered out, not an error.
Every step counts the rows it got, kept, filtered out and failed. `finish` joins the partitions and applies
what needs every row at once (duplicates across partitions, a pandera column that must be unique over the dataset).
"""

from __future__ import annotations

import functools
import math
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kiln.schemas.dataset_process import (
    FEATURIZERS,
    ML_ENERGY,
    ConvertStep,
    DatasetProcessInput,
    FeaturizeStep,
    FilterStep,
    ValidateStep,
)
from kiln.tasks.dataset.formats import Entry, EntryError, Row, parse_entry

READ_STEP = "read"
ERROR_COLUMNS = ("row_id", "step", "step_index", "error_type", "message")


class PipelineFailed(Exception):
    """A row failed a step whose policy is `fail`: the job ends failed, naming it."""

    def __init__(self, error: dict):
        self.error = error
        where = "reading" if error["step_index"] is None else f"steps.{error['step_index']} ({error['step']})"
        super().__init__(f"row {error['row_id']!r} failed {where} with policy 'fail': {error['error_type']}: "
                         f"{error['message']}")  # fmt: skip

    def __reduce__(self):
        # it crosses from a Dask process to the flow's: rebuilt from the error, not from its message
        return (PipelineFailed, (self.error,))


@dataclass
class StepCount:
    step: str
    step_index: int | None
    rows_in: int = 0
    rows_out: int = 0
    failed: int = 0
    filtered: int = 0
    seconds: float = 0.0

    def add(self, other: StepCount) -> None:
        self.rows_in += other.rows_in
        self.rows_out += other.rows_out
        self.failed += other.failed
        self.filtered += other.filtered
        self.seconds += other.seconds

    def as_dict(self) -> dict:
        return {"step": self.step, "step_index": self.step_index, "in": self.rows_in, "out": self.rows_out,
                "failed": self.failed, "filtered": self.filtered, "seconds": round(self.seconds, 3)}  # fmt: skip


@dataclass
class PartitionResult:
    rows: list[Row] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    quarantined: list[tuple[Row, dict]] = field(default_factory=list)
    counts: list[StepCount] = field(default_factory=list)


@dataclass
class _Outcome:
    kept: list[Row] = field(default_factory=list)
    filtered: int = 0
    failures: list[tuple[Row, str, str]] = field(default_factory=list)  # (row, error type, message)


def _error(row_id: str, step: str, step_index: int | None, error_type: str, message: str) -> dict:
    return {"row_id": row_id, "step": step, "step_index": step_index, "error_type": error_type, "message": message}


def run_partition(entries: list[Entry], request: DatasetProcessInput, models_path=None) -> PartitionResult:
    """Reads the entries and runs the request's steps on them; PipelineFailed when a `fail` policy is hit."""
    result = PartitionResult()
    started = time.perf_counter()
    read = StepCount(READ_STEP, None, rows_in=len(entries))
    rows: list[Row] = []
    for entry in entries:
        try:
            rows.append(parse_entry(entry, request.smiles_seed))
        except EntryError as exc:
            # a row that could not be read keeps its entry's text, for the quarantine table
            failure = (Row(entry.row_id, None, {**entry.properties, "raw_entry": entry.raw}), "EntryError", str(exc))
            _apply_policy(result, [failure], READ_STEP, None, request.on_read_error)
            read.failed += 1
    read.rows_out, read.seconds = len(rows), time.perf_counter() - started
    result.counts.append(read)
    for index, step in enumerate(request.steps):
        started = time.perf_counter()
        count = StepCount(step.step, index, rows_in=len(rows))
        outcome = _STEPS[type(step)](rows, step, models_path)
        _apply_policy(result, outcome.failures, step.step, index, step.policy)
        rows = outcome.kept
        count.rows_out, count.failed, count.filtered = len(rows), len(outcome.failures), outcome.filtered
        count.seconds = time.perf_counter() - started
        result.counts.append(count)
    result.rows = rows
    return result


def _apply_policy(result: PartitionResult, failures, step: str, index: int | None, policy: str) -> None:
    for row, error_type, message in failures:
        error = _error(row.row_id, step, index, error_type, message)
        result.errors.append(error)
        if policy == "fail":
            raise PipelineFailed(error)
        if policy == "quarantine":
            result.quarantined.append((row, error))


def _each(rows: list[Row], handle: Callable[[Row], Row | None]) -> _Outcome:
    """Runs `handle` on each row: a Row is kept, None is filtered out, an exception is the row's failure."""
    outcome = _Outcome()
    for row in rows:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kept = handle(row)
        except Exception as exc:  # noqa: BLE001 - a row's failure is data, whatever raised it
            outcome.failures.append((row, type(exc).__name__, str(exc) or repr(exc)))
            continue
        if kept is None:
            outcome.filtered += 1
        else:
            outcome.kept.append(kept)
    return outcome


def _periodic(row: Row, what: str):
    if not hasattr(row.structure, "lattice"):
        raise ValueError(f"a molecule has no cell, so no {what}")
    return row.structure


# convert


def _convert(rows: list[Row], step: ConvertStep, _models) -> _Outcome:
    def handle(row: Row) -> Row:
        if step.to == "sorted":
            row.structure = row.structure.get_sorted_structure()
            return row
        if step.to == "oxidation_states":
            from pymatgen.analysis.bond_valence import BVAnalyzer

            row.structure = BVAnalyzer().get_oxi_state_decorated_structure(_periodic(row, "bond valences"))
            return row
        structure = _periodic(row, f"{step.to} cell")
        if step.to == "niggli":
            row.structure = structure.get_reduced_structure("niggli")
            return row
        from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

        analyzer = SpacegroupAnalyzer(structure)
        row.structure = (analyzer.get_primitive_standard_structure() if step.to == "primitive"
                         else analyzer.get_conventional_standard_structure())  # fmt: skip
        return row

    return _each(rows, handle)


# filter


def _filter(rows: list[Row], step: FilterStep, models_path) -> _Outcome:
    include = set(step.elements_include or ())
    exclude = set(step.elements_exclude or ())
    pattern = re.compile(step.formula) if step.formula else None
    model_elements = _model_elements(step.in_domain, models_path) if step.in_domain else None

    def within(value: float, bounds) -> bool:
        return (bounds.min is None or value >= bounds.min) and (bounds.max is None or value <= bounds.max)

    def handle(row: Row) -> Row | None:
        structure = row.structure
        elements = {element.symbol for element in structure.composition.elements}
        if include and not include <= elements or exclude & elements:
            return None
        if step.nsites and not within(len(structure), step.nsites):
            return None
        if step.volume_per_atom and not within(_periodic(row, "volume").volume / len(structure), step.volume_per_atom):
            return None
        if step.density and not within(float(_periodic(row, "density").density), step.density):
            return None
        if pattern and not pattern.fullmatch(structure.composition.reduced_formula):
            return None
        if model_elements is not None:
            from kiln.schemas.structures import domain_report

            if not domain_report(_periodic(row, "domain check"), model_elements)["in_domain"]:
                return None
        return row

    outcome = _each(rows, handle)
    if step.duplicates:
        outcome.kept, duplicates = _unique_structures(outcome.kept)
        outcome.filtered += duplicates
    return outcome


def _unique_structures(rows: list[Row]) -> tuple[list[Row], int]:
    """The rows whose structure no earlier row's matches (pymatgen's StructureMatcher, default tolerances)."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    matcher = StructureMatcher()
    kept: list[Row] = []
    by_formula: dict[tuple, list[Row]] = {}
    for row in rows:
        key = (row.structure.composition.reduced_formula, hasattr(row.structure, "lattice"))
        earlier = by_formula.setdefault(key, [])
        if key[1] and any(matcher.fit(other.structure, row.structure) for other in earlier):
            continue
        if not key[1] and any(_same_molecule(other.structure, row.structure) for other in earlier):
            continue
        earlier.append(row)
        kept.append(row)
    return kept, len(rows) - len(kept)


def _same_molecule(a, b) -> bool:
    from pymatgen.analysis.molecule_matcher import KabschMatcher

    if len(a) != len(b) or sorted(map(str, a.species)) != sorted(map(str, b.species)):
        return False
    try:
        return KabschMatcher(a).fit(b)[2] < 0.1
    except Exception:  # noqa: BLE001 - different atom orders: not the same here
        return False


def _model_elements(model: str, models_path) -> set[str]:
    from kiln.tasks.ml.models import MODELS, model_path

    if models_path is not None:
        model_path(model, models_path)
    return set(MODELS[model].elements)


# featurize


@functools.lru_cache(maxsize=64)
def featurizer(name: str, preset: str | None):
    """The matminer featurizer, built once per process (presets read data files)."""
    import importlib

    module, _, _ = FEATURIZERS[name]
    cls = getattr(importlib.import_module(module), name)
    instance = cls.from_preset(preset) if preset else cls()
    if hasattr(instance, "set_n_jobs"):
        instance.set_n_jobs(1)
    return instance


def _featurize(rows: list[Row], step: FeaturizeStep, models_path) -> _Outcome:
    outcome = _Outcome(kept=list(rows))
    for spec in step.featurizers:
        if spec.name == ML_ENERGY:
            outcome = _merge(outcome, _ml_energy(outcome.kept, spec.model, models_path))
            continue
        instance = featurizer(spec.name, spec.preset)
        labels = instance.feature_labels()
        reads = FEATURIZERS[spec.name][1]

        def handle(row: Row, instance=instance, labels=labels, reads=reads, name=spec.name) -> Row:
            target = row.structure.composition if reads == "composition" else _periodic(row, f"{name} features")
            try:
                values = instance.featurize(target)
            except Exception as exc:  # noqa: BLE001 - say which featurizer failed
                raise type(exc)(f"{name}: {exc}") if _rebuildable(exc) else exc
            for label, value in zip(labels, values):
                row.properties[label] = _feature_value(value)
            return row

        outcome = _merge(outcome, _each(outcome.kept, handle))
    return outcome


def _rebuildable(exc: Exception) -> bool:
    try:
        type(exc)("x")
    except Exception:  # noqa: BLE001
        return False
    return True


def _feature_value(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, (int, float, str)):
        return value
    return str(value)


def _merge(before: _Outcome, after: _Outcome) -> _Outcome:
    return _Outcome(kept=after.kept, filtered=before.filtered + after.filtered,
                    failures=before.failures + after.failures)  # fmt: skip


def _ml_energy(rows: list[Row], model: str, models_path) -> _Outcome:
    """Energies of the rows through the kiln model, loaded once per process and batched as ml_predict batches."""
    from kiln.tasks.ml import predict as ml
    from kiln.tasks.ml.models import load_potential

    potential = load_potential(model, models_path)
    known = set(potential.model.element_types)
    outcome = _Outcome()
    ready = []
    for row in rows:
        unknown = sorted({el.symbol for el in row.structure.composition.elements} - known)
        if unknown:
            outcome.failures.append((row, "OutOfDomain", f"ml_energy: {model} was not trained on {', '.join(unknown)}"))
        else:
            ready.append(row)
    batch = ml.DEFAULT_BATCH_SIZE["energy"]
    for start in range(0, len(ready), batch):
        chunk = ready[start : start + batch]
        try:
            results = ml.predict(potential, [row.structure for row in chunk], batch_size=batch)
        except Exception as exc:  # noqa: BLE001 - a batch that fails is retried row by row, to blame the row
            results = []
            for row in chunk:
                try:
                    results.append(ml.predict(potential, [row.structure], batch_size=1)[0])
                except Exception as one:  # noqa: BLE001
                    results.append(one)
            del exc
        for row, out in zip(chunk, results):
            if isinstance(out, Exception):
                outcome.failures.append((row, type(out).__name__, f"ml_energy: {out}"))
                continue
            row.properties["ml_energy"] = float(out["energy_per_atom"])
            row.properties["ml_total_energy"] = float(out["total_energy"])
            outcome.kept.append(row)
    return outcome


# validate


def _validate(rows: list[Row], step: ValidateStep, _models) -> _Outcome:
    def handle(row: Row) -> Row:
        if step.min_distance:
            _check_distances(row.structure, step.min_distance)
        if step.charge_balance:
            _check_charge_balance(row.structure)
        return row

    outcome = _each(rows, handle)
    if step.pandera_schema is not None and outcome.kept:
        outcome = _pandera(outcome, step)
    return outcome


class OverlappingAtoms(ValueError):
    """Two atoms are closer than the step's minimum distance."""


class ChargeImbalance(ValueError):
    """The row's oxidation states do not sum to zero."""


def _check_distances(structure, minimum: float) -> None:
    import numpy as np

    if hasattr(structure, "lattice"):
        centers, neighbours, _, distances = structure.get_neighbor_list(minimum)
        if not len(distances):
            return
        k = int(np.argmin(distances))
        i, j, d = int(centers[k]), int(neighbours[k]), float(distances[k])
    else:
        matrix = structure.distance_matrix + np.eye(len(structure)) * 1e9
        i, j = np.unravel_index(int(np.argmin(matrix)), matrix.shape)
        d = float(matrix[i, j])
        if d >= minimum:
            return
    other = "its periodic image" if i == j else f"atom {j} ({structure[j].species_string})"
    raise OverlappingAtoms(f"atom {i} ({structure[i].species_string}) and {other} are {d:.3f} Å apart, closer "
                           f"than {minimum} Å")  # fmt: skip


def _check_charge_balance(structure) -> None:
    states = [getattr(site.specie, "oxi_state", None) for site in structure]
    if all(s is not None for s in states):
        total = sum(states)
        if abs(total) > 1e-6:
            raise ChargeImbalance(f"the oxidation states given sum to {total:+g}, not 0")
        return
    composition = structure.composition.element_composition
    if all(element.is_metal for element in composition.elements):
        return  # metals and alloys: no ionic charge balance to check
    if len(composition.elements) == 1:
        return
    if not composition.oxi_state_guesses(max_sites=-50):
        raise ChargeImbalance(f"{composition.reduced_formula}: no assignment of common oxidation states sums to 0")


def pandera_schema(step: ValidateStep, *, unique: bool):
    """The step's schema as a pandera DataFrameSchema; `unique` False leaves uniqueness to `finish`."""
    import pandera.pandas as pa

    dtypes = {"float": float, "float64": "float64", "int": int, "int64": "int64", "str": str, "bool": bool}
    columns = {}
    for name, rule in step.pandera_schema.columns.items():
        checks = []
        for check, argument in rule.checks.items():
            builder = getattr(pa.Check, check)
            checks.append(builder(**argument) if isinstance(argument, dict) else builder(argument))
        columns[name] = pa.Column(dtypes.get(rule.dtype) if rule.dtype else None, checks=checks,
                                  nullable=rule.nullable, unique=rule.unique and unique, required=rule.required)  # fmt: skip
    return pa.DataFrameSchema(columns, strict=step.pandera_schema.strict)


class SchemaMismatch(Exception):
    """The dataset as a whole does not fit the schema (a required column is missing): no row is to blame."""


def _pandera(outcome: _Outcome, step: ValidateStep) -> _Outcome:
    import pandas as pd
    import pandera.errors

    frame = pd.DataFrame([row.properties for row in outcome.kept])
    try:
        pandera_schema(step, unique=False).validate(frame, lazy=True)
        return outcome
    except pandera.errors.SchemaErrors as exc:
        cases = exc.failure_cases
    failed: dict[int, list[str]] = {}
    for case in cases.to_dict("records"):
        index = case.get("index")
        if index is None or (isinstance(index, float) and math.isnan(index)):
            raise SchemaMismatch(f"schema: {case.get('column') or 'the dataset'}: {case.get('check')}: "
                                 f"{case.get('failure_case')}")  # fmt: skip
        failed.setdefault(int(index), []).append(
            f"column {case['column']!r}: value {case['failure_case']!r} fails {case['check']}")
    kept, failures = [], list(outcome.failures)
    for position, row in enumerate(outcome.kept):
        if position in failed:
            failures.append((row, "SchemaError", "; ".join(failed[position])))
        else:
            kept.append(row)
    return _Outcome(kept=kept, filtered=outcome.filtered, failures=failures)


def require_models(job_input: DatasetProcessInput, settings) -> None:
    """Refuses at submission a pipeline naming a kiln ML model this installation does not have (JobType.check)."""
    from kiln.tasks.ml.models import model_path

    for model in job_input.ml_models():
        model_path(model, settings.models_path)


def model_versions(job_input: DatasetProcessInput) -> dict[str, str | None]:
    """The versions of the models the pipeline names (JobType.versions): part of its cache key."""
    from kiln.tasks.ml.models import MODELS

    return {model: MODELS[model].version if model in MODELS else None for model in job_input.ml_models()}


_STEPS = {ConvertStep: _convert, FilterStep: _filter, FeaturizeStep: _featurize, ValidateStep: _validate}


def finish(results: list[PartitionResult], request: DatasetProcessInput, unique: bool = True) -> PartitionResult:
    """The partitions joined in order; duplicates filtered across partitions, and the pandera columns that must be
    unique checked over every row (unless `unique` is False)."""
    total = PartitionResult()
    for part in results:
        total.rows += part.rows
        total.errors += part.errors
        total.quarantined += part.quarantined
        if not total.counts:
            total.counts = [StepCount(c.step, c.step_index) for c in part.counts]
        for mine, theirs in zip(total.counts, part.counts):
            mine.add(theirs)
    for index, step in enumerate(request.steps):
        if isinstance(step, FilterStep) and step.duplicates and len(results) > 1:
            # each partition dropped its own duplicates; a structure may also match one of an earlier partition
            total.rows, removed = _unique_structures(total.rows)
            _recount(total.counts, index, removed, filtered=True)
    for index, step in enumerate(request.steps if unique else ()):
        if not isinstance(step, ValidateStep) or step.pandera_schema is None:
            continue
        columns = [name for name, rule in step.pandera_schema.columns.items() if rule.unique]
        if not columns:
            continue
        seen: dict[str, dict[Any, str]] = {name: {} for name in columns}
        kept, failures = [], []
        for row in total.rows:
            clash = [(name, row.properties.get(name)) for name in columns
                     if row.properties.get(name) is not None and row.properties.get(name) in seen[name]]  # fmt: skip
            if clash:
                failures.append((row, "SchemaError", "; ".join(
                    f"column {name!r}: value {value!r} fails field_uniqueness (first in row {seen[name][value]!r})"
                    for name, value in clash)))  # fmt: skip
                continue
            for name in columns:
                value = row.properties.get(name)
                if value is not None:
                    seen[name][value] = row.row_id
            kept.append(row)
        _apply_policy(total, failures, step.step, index, step.policy)
        total.rows = kept
        _recount(total.counts, index, len(failures), filtered=False)
    return total


def _recount(counts: list[StepCount], index: int, removed: int, *, filtered: bool) -> None:
    """Counts after `removed` rows, which had passed step `index` and every later one in their partitions, were
    taken out at that step once every partition was done."""
    for count in counts:
        if count.step_index is None or count.step_index < index:
            continue
        count.rows_out -= removed
        if count.step_index > index:
            count.rows_in -= removed
        elif filtered:
            count.filtered += removed
        else:
            count.failed += removed
