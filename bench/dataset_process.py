"""dataset_process against matminer itself, in one run: magpie ElementProperty + DensityFeatures on dcdft, scaled.

Starts its own embedded kiln (one worker slot: the flow's process and the service slot's take partitions).
dcdft's 71 crystals are replicated and perturbed (a fixed seed) to each size asked; for each:
  kiln: the dataset uploaded as Parquet, one dataset_process job (featurize magpie ElementProperty and
        DensityFeatures), timed from just before the POST to the job's completion seen by the SDK;
  matminer: the same rows read from the same Parquet file in this process, then matminer's own
        featurize_dataframe(n_jobs=2) of both featurizers (its multiprocessing pool), timed from the read.
Wall time and rows/s of each, their ratio, and kiln's scaling from the smallest size to the largest (goal: linear).
Exits non-zero unless every kiln job completed through a flow run of its own (no cache hit) with every row out.

    python bench/dataset_process.py [--sizes 10000 100000] [--partitions 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import embedded_stack, must_have_run


def dataset(size: int, seed: int = 2026) -> Path:
    """dcdft replicated and perturbed to `size` rows, as a Parquet file (the structures as pymatgen JSON)."""
    import numpy as np
    from ase.collections import dcdft
    from pymatgen.io.ase import AseAtomsAdaptor

    from kiln.tasks.dataset.formats import Row, write_dataset

    rng = np.random.default_rng(seed)
    # DensityFeatures has no radius for the noble gases: they would be errors on both sides, not work
    names = [name for name in dcdft.names if name not in ("He", "Ne", "Ar", "Kr", "Xe", "Rn")]
    base = [AseAtomsAdaptor.get_structure(dcdft[name]) for name in names]
    rows = []
    for index in range(size):
        structure = base[index % len(base)].copy()
        shift = rng.normal(0, 0.02, (len(structure), 3))
        for site, delta in enumerate(shift):
            structure.translate_sites([site], delta, frac_coords=False, to_unit_cell=False)
        structure.scale_lattice(structure.volume * rng.uniform(0.97, 1.03))
        rows.append(Row(f"{names[index % len(base)]}-{index}", structure, {}))
    path = Path(tempfile.mkdtemp(prefix="kiln-bench-data-")) / f"dcdft-{size}.parquet"
    return write_dataset(rows, "parquet", path)


def matminer_run(path: Path) -> tuple[float, int]:
    """Seconds for matminer itself: the Parquet read into Structures, then featurize_dataframe(n_jobs=2) twice."""
    import pandas as pd
    import pyarrow.parquet as pq
    from matminer.featurizers.composition import ElementProperty
    from matminer.featurizers.structure import DensityFeatures
    from pymatgen.core import Structure

    started = time.perf_counter()
    table = pq.read_table(path).to_pydict()
    frame = pd.DataFrame({"structure": [Structure.from_dict(json.loads(s)) for s in table["structure"]]})
    frame["composition"] = [s.composition for s in frame["structure"]]
    magpie = ElementProperty.from_preset("magpie")
    magpie.set_n_jobs(2)
    frame = magpie.featurize_dataframe(frame, "composition", pbar=False)
    density = DensityFeatures()
    density.set_n_jobs(2)
    frame = density.featurize_dataframe(frame, "structure", pbar=False)
    return time.perf_counter() - started, len(frame)


def kiln_run(client, path: Path, partition_rows: int) -> tuple[float, dict]:
    name = path.name
    client.files.upload(str(path))
    started = time.perf_counter()
    job = client.jobs.create(type="dataset_process", refresh=True, input={
        "source": {"file": name}, "partition_rows": partition_rows,
        "steps": [{"step": "featurize", "featurizers": [{"name": "ElementProperty", "preset": "magpie"},
                                                        {"name": "DensityFeatures"}]}]}).wait(timeout=7200)  # fmt: skip
    seconds = time.perf_counter() - started
    must_have_run(job)
    return seconds, job.output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--partitions", type=int, default=20, help="partitions per job: partition_rows = size / this")
    args = parser.parse_args()

    from kiln.sdk import Client

    results = []
    with embedded_stack(slots=1) as (settings, _, key):
        with Client(settings.api_url, key, timeout=600) as client:
            # a first small job warms the worker's processes (imports), as a running kiln's are
            kiln_run(client, dataset(142), 71)
            for size in args.sizes:
                path = dataset(size)
                kiln_seconds, output = kiln_run(client, path, max(1, -(-size // args.partitions)))
                if output["rows_out"] != size:
                    print(f"kiln: {output['rows_out']} of {size} rows out: {output['steps']}")
                    return 1
                matminer_seconds, rows = matminer_run(path)
                results.append((size, kiln_seconds, matminer_seconds, output["partitions"]))
                print(f"{size:>7} rows  kiln {kiln_seconds:8.1f} s ({size / kiln_seconds:7.0f} rows/s, "
                      f"{output['partitions']} partitions)  matminer n_jobs=2 {matminer_seconds:8.1f} s "
                      f"({rows / matminer_seconds:7.0f} rows/s)  kiln/matminer {kiln_seconds / matminer_seconds:.2f}",
                      flush=True)  # fmt: skip
    if len(results) > 1:
        (small, ks, _, _), (large, kl, _, _) = results[0], results[-1]
        print(f"kiln scaling {small} → {large} rows: time ×{kl / ks:.2f} for rows ×{large / small:.0f} "
              f"(linear: ×{large / small:.0f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
