"""A Debian bookworm image with Python for the tests that need it, built by mmdebstrap from this machine's Debian
mirror as an OCI layout and cached by its inputs under /var/cache/kiln-test-images; and the plugin they run in it.

The image is the `essential` variant plus python3-minimal and libpython3.11-stdlib (python3-minimal alone has no
json), without docs, man pages and locales, and with a merged /usr made by mmdebstrap's hook rather than by the
usrmerge package (which would bring all of perl): a 90 MB tar. Its layer is gzip level 1, 35 MB in 2 s here;
level 6 took 7 s for 32 MB.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable

import pytest

from kiln.tasks.plugin.images import MOUNT_POINTS
from tests.sandbox.oci_layout import TAR_GZIP, finish_layout

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path("/var/cache/kiln-test-images")
SUITE = "bookworm"
VARIANT = "essential"
PACKAGES = ("python3-minimal", "libpython3.11-stdlib")
DPKG_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")
MERGED_USR_HOOK = Path("/usr/share/mmdebstrap/hooks/merged-usr")
DEFAULT_MIRROR = "http://deb.debian.org/debian/"
ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8",
       "PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1"]  # fmt: skip
# bump when the way the layout is written changes, so that caches of the old way are not used
LAYOUT_VERSION = 1
# the host's apt settings that decide whether its mirror answers; mmdebstrap's apt reads none of the host's config
HOST_APT_OPTIONS = re.compile(r'^(Acquire::(?:Check-Valid-Until|Check-Date|https?::Proxy(?:::\S+)?)) "(.*)";$')
UNREACHABLE = re.compile(r"^E: Failed to fetch .*$", re.MULTILINE)
class ImageBuildFailed(Exception):
    """mmdebstrap did not build the image; the message has the end of its log."""


class MirrorUnreachable(ImageBuildFailed):
    """mmdebstrap could not download from the Debian mirror; the message has apt's error."""


def debian_mirror(suite: str = SUITE, sources: Path = Path("/etc/apt")) -> str:
    """The mirror this machine's apt takes `suite` from (sources.list, sources.list.d/*.list or *.sources), else
    deb.debian.org. (`apt-get indextargets` says the same in a second; this reads the files in a millisecond.)"""
    for path in (sources / "sources.list", *sorted((sources / "sources.list.d").glob("*"))):
        if not path.is_file():
            continue
        text = re.sub(r"(?m)^#.*\n?", "", path.read_text())
        if path.suffix == ".sources":  # deb822: stanzas of Types, URIs, Suites, Enabled
            for stanza in re.split(r"\n\s*\n", text):
                fields = {k.lower(): v.split() for k, v in re.findall(r"(?m)^(\S+):\s*(.*(?:\n[ \t].*)*)", stanza)}
                if "deb" in fields.get("types", []) and suite in fields.get("suites", []) and \
                        fields.get("enabled", ["yes"]) != ["no"] and fields.get("uris"):  # fmt: skip
                    return fields["uris"][0]
        elif path.name == "sources.list" or path.suffix == ".list":  # deb [options] uri suite components
            for uri, listed in re.findall(r"(?m)^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", text):
                if listed == suite:
                    return uri
    return DEFAULT_MIRROR


def host_apt_options() -> list[str]:
    """The host's settings for reaching its mirror (a snapshot's expired Release, a proxy) as mmdebstrap --aptopt."""
    dump = subprocess.run(["apt-config", "dump"], capture_output=True, text=True).stdout
    return [f'--aptopt={m[1]} "{m[2]}"' for m in map(HOST_APT_OPTIONS.match, dump.splitlines()) if m]


def image_inputs(mirror: str) -> dict:
    """What the image is built from: the cache key."""
    version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "mmdebstrap"], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    return {"suite": SUITE, "variant": VARIANT, "packages": PACKAGES, "dpkg_excludes": DPKG_EXCLUDES,
            "hooks": [MERGED_USR_HOOK.name], "mirror": mirror.rstrip("/"), "mmdebstrap": version, "env": ENV,
            "mount_points": MOUNT_POINTS, "layout": LAYOUT_VERSION}  # fmt: skip


def whole(layout: Path) -> bool:
    """Whether the layout's index, manifests, configs and layers are all there, each of its size and digest."""

    def blob(ref: dict) -> Path:
        path = layout / "blobs" / ref["digest"].replace(":", "/")
        digest = hashlib.sha256()
        with path.open("rb") as data:
            while chunk := data.read(1 << 20):
                digest.update(chunk)
        if (path.stat().st_size, f"sha256:{digest.hexdigest()}") != (ref["size"], ref["digest"]):
            raise ValueError(f"{path} is not the blob its descriptor names")
        return path

    try:
        for ref in json.loads((layout / "index.json").read_text())["manifests"]:
            manifest = json.loads(blob(ref).read_text())
            for part in (manifest["config"], *manifest["layers"]):
                blob(part)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (layout / "oci-layout").is_file()


def cached_layout(name: str, inputs: dict, build: Callable[[Path], None], cache: Path = CACHE) -> Path:
    """The layout `build` writes for `inputs`, from cache/<name>-<key of inputs> when a whole one is there.

    It is built into a hidden folder beside it and renamed into place once whole, under a lock: a build that was
    killed leaves only a hidden folder (removed by the next), a corrupt entry is built again, and two sessions
    on one machine build it once."""
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache / f"{name}-{key}"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{folder.name}.lock", "ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if whole(folder):
            return folder
        for stale in (folder, *cache.glob(f".{folder.name}-*")):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=cache))
        try:
            build(staging)
            if not whole(staging):
                raise AssertionError(f"the build of {folder.name} wrote an incomplete layout")
            (staging / "inputs.json").write_text(json.dumps(inputs, indent=1))
            staging.chmod(0o755)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


class _GzipLayer:
    """A gzip layer blob as it is written: the digests of its tar (the config's diff_id) and of the blob."""

    def __init__(self, path: Path):
        self.file = path.open("wb")
        self.tar_digest, self.blob_digest, self.size = hashlib.sha256(), hashlib.sha256(), 0
        self.compressor = zlib.compressobj(1, wbits=31)

    def write(self, data: bytes) -> int:
        self.tar_digest.update(data)
        self._out(self.compressor.compress(data))
        return len(data)

    def _out(self, data: bytes) -> None:
        self.blob_digest.update(data)
        self.file.write(data)
        self.size += len(data)

    def close(self) -> dict:
        """Ends the blob; its descriptor."""
        self._out(self.compressor.flush())
        self.file.close()
        return {"mediaType": TAR_GZIP, "digest": f"sha256:{self.blob_digest.hexdigest()}", "size": self.size}


def _copy_rootfs(source: tarfile.TarFile, target: tarfile.TarFile) -> None:
    """mmdebstrap's tar without the device nodes under /dev (both sandboxes mount a /dev of their own), and with
    every folder the sandboxes mount on."""
    seen = set()
    for member in source:
        name = member.name.removeprefix("./")
        if name.startswith("dev/"):
            continue
        target.addfile(member, source.extractfile(member) if member.isreg() else None)
        seen.add(name)
    for folder in MOUNT_POINTS:
        if folder not in seen:
            info = tarfile.TarInfo(f"./{folder}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o1777 if folder == "tmp" else 0o755, time.time()
            target.addfile(info)


def build_python_layout(layout: Path, mirror: str | None = None) -> None:
    """Writes the Python image into the empty folder `layout`: mmdebstrap's tar streamed into a gzip layer.

    Raises MirrorUnreachable when apt could not download from the mirror, ImageBuildFailed on any other failure."""
    mirror = mirror or debian_mirror()
    (layout / "blobs" / "sha256").mkdir(parents=True)
    argv = ["mmdebstrap", f"--variant={VARIANT}", f"--include={','.join(PACKAGES)}", "--format=tar",
            f"--hook-dir={MERGED_USR_HOOK}", *(f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES),
            *host_apt_options(), SUITE, "-", f"deb {mirror} {SUITE} main"]  # fmt: skip
    partial = layout / "blobs" / "sha256" / "layer.partial"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        layer = _GzipLayer(partial)
        try:
            with tarfile.open(fileobj=process.stdout, mode="r|") as source, \
                    tarfile.open(fileobj=layer, mode="w|", format=tarfile.PAX_FORMAT) as target:  # fmt: skip
                _copy_rootfs(source, target)
        except tarfile.TarError:  # mmdebstrap failed before or while writing its tar: its exit code says why
            pass
        finally:
            process.stdout.close()
            descriptor = layer.close()
            returncode = process.wait()
        log.seek(0)
        output = log.read().decode(errors="replace")
    if returncode != 0:
        if fetch_failed := UNREACHABLE.search(output):
            raise MirrorUnreachable(f"mmdebstrap cannot reach the Debian mirror {mirror}: {fetch_failed[0][3:]}")
        raise ImageBuildFailed(f"mmdebstrap failed with exit code {returncode}; the end of its log:\n{output[-4000:]}")
    partial.rename(layout / "blobs" / "sha256" / descriptor["digest"].removeprefix("sha256:"))
    finish_layout(layout, descriptor, f"sha256:{layer.tar_digest.hexdigest()}", cmd=["python3"], env=ENV)


def python_image(cache: Path = CACHE) -> Path:
    """The Python image's OCI layout, built once per machine (and again when its inputs change)."""
    mirror = debian_mirror()
    return cached_layout(f"python-{SUITE}", image_inputs(mirror), lambda layout: build_python_layout(layout, mirror),
                         cache)  # fmt: skip


@pytest.fixture(scope="session")
def python_layout() -> Path:
    """The Python image's OCI layout; skipped only when mmdebstrap cannot reach the Debian mirror to build it."""
    subprocess.run([str(ROOT / "scripts" / "sandbox-deps.sh")], check=True)
    try:
        return python_image()
    except MirrorUnreachable as unreachable:
        pytest.skip(str(unreachable))


# the plugin the tests run in the image, a plain script of the standard library
CELL_SUMMARY = (ROOT / "tests" / "fixtures" / "cell_summary.py").read_text()
# wurtzite ZnO: a hexagonal cell, so the volume is not just a product of lengths
ZNO = {
    "lattice": [[3.25, 0.0, 0.0], [-1.625, 2.81458, 0.0], [0.0, 0.0, 5.207]],
    "species": ["Zn", "Zn", "O", "O"],
    "coords": [[1 / 3, 2 / 3, 0.0], [2 / 3, 1 / 3, 0.5], [1 / 3, 2 / 3, 0.382], [2 / 3, 1 / 3, 0.882]],
}


def check_cell_summary(output: dict, stdout: str, sites_csv: str) -> None:
    """Asserts what CELL_SUMMARY made of ZNO (its output.json, stdout and sites.csv) against pymatgen's reading."""
    from pymatgen.core import Structure

    zno = Structure(ZNO["lattice"], ZNO["species"], ZNO["coords"])
    assert (output["formula"], output["composition"], output["sites"]) == ("ZnO", {"Zn": 2, "O": 2}, 4)
    assert output["volume"] == pytest.approx(zno.volume, rel=1e-9)
    assert output["density"] == pytest.approx(float(zno.density), rel=1e-3)  # pymatgen's masses differ a little
    assert stdout.splitlines() == ["read 4 sites", f"volume {output['volume']:.3f} A^3",
                                   f"density {output['density']:.3f} g/cm^3", "wrote sites.csv (4 rows)"]  # fmt: skip
    header, *rows = list(csv.reader(io.StringIO(sites_csv)))
    assert header == ["species", "a", "b", "c", "x", "y", "z"]
    assert [row[0] for row in rows] == ZNO["species"]
    assert [float(x) for row in rows for x in row[4:]] == pytest.approx(zno.cart_coords.flatten().tolist(), abs=1e-6)
