"""Dataset loaders against anomalib's datamodules on the same fake trees.

Builds small fake copies in the official layouts, with each dataset's real mask conventions (MVTec AD: 0/255;
VisA: raw masks whose defects are small integers 1, 2 and a palette mask with a dark defect colour; BTAD:
0/255 PNG), reads them with dualclip's loaders here and with anomalib's own code in its environment
(``benchmarks/.venv-anomalib``, made by ``make bench-env``): ``make_mvtec_ad_dataset``, VisA's
``apply_cls1_split`` + ``make_mvtec_ad_dataset``, ``make_btech_dataset``, masks by anomalib's ``read_mask``.
It compares the test sample lists, labels and binary masks pixel for pixel, prints a table and exits 1 on
any difference.

    .venv/bin/python -m benchmarks.parity.dataset_parity [--json runs/bench/dataset_parity.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import ANOMALIB_PY
from dualclip.atomic import write_json
from dualclip.data import datasets as D

SIZE = 48


def _square(i: int) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), dtype=bool)
    m[6 + 3 * (i % 4) : 22 + 3 * (i % 4), 8 + 2 * (i % 5) : 20 + 2 * (i % 5)] = True
    return m


def _image(path: Path, i: int) -> None:
    rng = np.random.default_rng(i)
    Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)


def build(root: Path) -> None:
    # MVTec AD: <root>/mvtec/bottle/{train,test}/..., ground_truth/<defect>/<name>_mask.png (0/255)
    mv = root / "mvtec" / "bottle"
    for sub in ("train/good", "test/good", "test/broken", "ground_truth/broken"):
        (mv / sub).mkdir(parents=True)
    for i in range(3):
        _image(mv / "train" / "good" / f"{i:03d}.png", i)
        _image(mv / "test" / "good" / f"{i:03d}.png", 10 + i)
    for i in range(3):
        _image(mv / "test" / "broken" / f"{i:03d}.png", 20 + i)
        Image.fromarray(_square(i).astype(np.uint8) * 255).save(mv / "ground_truth" / "broken" / f"{i:03d}_mask.png")
    # VisA raw: <root>/visa/pcb1/Data/{Images,Masks}/..., split_csv/1cls.csv; masks with small integers / palette
    va = root / "visa"
    for sub in ("pcb1/Data/Images/Normal", "pcb1/Data/Images/Anomaly", "pcb1/Data/Masks/Anomaly", "split_csv"):
        (va / sub).mkdir(parents=True)
    rows = ["object,split,label,image,mask"]
    for i in range(3):
        img = f"pcb1/Data/Images/Normal/{i:04d}.JPG"
        _image(va / img, 30 + i)
        rows.append(f"pcb1,{'train' if i == 0 else 'test'},normal,{img},")
    for i in range(3):
        img, mask = f"pcb1/Data/Images/Anomaly/{i + 100:03d}.JPG", f"pcb1/Data/Masks/Anomaly/{i + 100:03d}.png"
        _image(va / img, 40 + i)
        m = _square(i)
        if i == 2:  # palette: index 1 = defect, a dark colour; index 0 black
            p = Image.fromarray(m.astype(np.uint8), mode="P")
            p.putpalette([0, 0, 0, 3, 0, 0] + [0, 0, 0] * 254)
            p.save(va / mask)
        else:  # raw VisA: defect pixels are 1 (and 2 for a second defect)
            arr = m.astype(np.uint8)
            arr[: SIZE // 3][m[: SIZE // 3]] = 2
            Image.fromarray(arr, mode="L").save(va / mask)
        rows.append(f"pcb1,test,anomaly,{img},{mask}")
    (va / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    # BTAD: <root>/btad/01/test/{ok,ko}/*.bmp, ground_truth/ko/*.png
    bt = root / "btad" / "01"
    for sub in ("train/ok", "test/ok", "test/ko", "ground_truth/ko"):
        (bt / sub).mkdir(parents=True)
    _image(bt / "train" / "ok" / "0000.bmp", 50)
    for i in range(2):
        _image(bt / "test" / "ok" / f"{i:04d}.bmp", 51 + i)
    for i in range(2, 4):
        _image(bt / "test" / "ko" / f"{i:04d}.bmp", 60 + i)
        Image.fromarray(_square(i).astype(np.uint8) * 255).save(bt / "ground_truth" / "ko" / f"{i:04d}.png")


def _digest(mask: np.ndarray) -> str:
    return hashlib.sha256(np.packbits(mask.astype(bool)).tobytes()).hexdigest()[:16] + f":{int(mask.sum())}"


def ours(root: Path) -> dict[str, list]:
    out = {}
    for name, cats in (
        ("mvtec", D.mvtec(root / "mvtec")),
        ("visa", D.visa(root / "visa")),
        ("btad", D.btad(root / "btad")),
    ):
        (cat,) = cats
        out[name] = sorted(
            [s.path.stem, s.label, _digest(D.read_mask(s.mask)) if s.mask else None] for s in cat.samples
        )
    return out


ANOMALIB_SCRIPT = r"""
import hashlib, json, sys, warnings
from pathlib import Path
import numpy as np
warnings.filterwarnings("ignore")
from anomalib.data.datasets.image.mvtecad import make_mvtec_ad_dataset
from anomalib.data.datasets.image.btech import make_btech_dataset
from anomalib.data.datamodules.image.visa import Visa
from anomalib.data.datasets.image.visa import EXTENSIONS as VISA_EXTENSIONS
from anomalib.data.utils.image import read_mask

root = Path(sys.argv[1])

def digest(mask):
    m = np.asarray(mask) > 0
    return hashlib.sha256(np.packbits(m).tobytes()).hexdigest()[:16] + f":{int(m.sum())}"

def rows(df):
    out = []
    for _, r in df.iterrows():
        mask = r.get("mask_path") or ""
        has = bool(mask) and Path(mask).is_file()
        out.append([Path(r.image_path).stem, int(r.label_index), digest(read_mask(mask)) if has and r.label_index else None])
    return sorted(out)

visa = Visa(root=root / "visa", category="pcb1")
visa.apply_cls1_split()
print(json.dumps({
    "mvtec": rows(make_mvtec_ad_dataset(root / "mvtec" / "bottle", split="test")),
    "visa": rows(make_mvtec_ad_dataset(root / "visa" / "visa_pytorch" / "pcb1", split="test", extensions=VISA_EXTENSIONS)),
    "btad": rows(make_btech_dataset(root / "btad" / "01", split="test")),
}))
"""


def theirs(root: Path) -> dict[str, list]:
    proc = subprocess.run(
        [str(ANOMALIB_PY), "-c", ANOMALIB_SCRIPT, str(root)], capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise RuntimeError(f"anomalib side failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="also write the comparison here")
    args = ap.parse_args()
    if not ANOMALIB_PY.is_file():
        print(f"dataset_parity: skipped, {ANOMALIB_PY} is absent (make bench-env)", file=sys.stderr)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root)
        a, b = ours(root), theirs(root)
    print("| layout | test samples (dualclip / anomalib) | anomalous | masks compared | identical |")
    print("|---|---|---|---|---|")
    ok = True
    report = {}
    for name in ("mvtec", "visa", "btad"):
        same = a[name] == b[name]
        ok &= same
        n_masks = sum(r[2] is not None for r in a[name])
        n_bad = sum(r[1] for r in a[name])
        print(f"| {name} | {len(a[name])} / {len(b[name])} | {n_bad} | {n_masks} | {'yes' if same else 'NO'} |")
        report[name] = {"dualclip": a[name], "anomalib": b[name], "identical": same}
    if args.json:
        write_json(args.json, report)
    if not ok:
        for name, r in report.items():
            if not r["identical"]:
                print(f"{name}: dualclip {r['dualclip']}\n{name}: anomalib {r['anomalib']}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
