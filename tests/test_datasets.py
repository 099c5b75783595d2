"""Dataset layouts with each dataset's real mask conventions, loud loader errors, images without masks.

Every fake copy uses that dataset's own value convention (VisA: raw masks with small integer values 1, 2;
palette masks whose defect index has a dark colour; 1-bit masks; MVTec/MPDD/BTAD 0/255). The oracle: a map
that is exactly the planted defect square, scored against the loaded masks, gives pixel AUROC 1.0.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import write_mvtec_tree
from dualclip import DetectorConfig
from dualclip.data import datasets as D
from dualclip.evaluation import run_eval
from dualclip.metrics import pixel_auroc

SIZE = 64


def _square(i: int) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), dtype=bool)
    y, x = 8 + 4 * (i % 5), 10 + 3 * (i % 7)
    m[y : y + 16, x : x + 12] = True
    return m


def _save_mask(mask: np.ndarray, path, convention: str) -> None:
    if convention == "0/255":
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    elif convention == "visa-raw":  # defect pixels carry small integers (1 = first defect, 2 = second ...)
        arr = mask.astype(np.uint8) * 1
        arr[: SIZE // 2][mask[: SIZE // 2]] = 2
        Image.fromarray(arr, mode="L").save(path)
    elif convention == "palette":  # index 1 = defect, coloured almost black
        img = Image.fromarray(mask.astype(np.uint8), mode="P")
        img.putpalette([255, 255, 255, 3, 0, 0] + [0, 0, 0] * 254)
        img.save(path)
    elif convention == "1-bit":
        Image.fromarray(mask).convert("1").save(path)
    else:
        raise AssertionError(convention)


def _image(path) -> None:
    Image.fromarray(np.full((SIZE, SIZE, 3), 128, np.uint8)).save(path)


def _oracle(cat: D.Category) -> float:
    truth = np.stack([_square(i) if s.label else np.zeros((SIZE, SIZE), bool) for i, s in enumerate(cat.samples)])
    return pixel_auroc(cat.masks(SIZE), truth.astype(np.float32))


def _visa_tree(root, convention: str, header: str = "object,split,label,image,mask", sep: str = ",", bom=False):
    (root / "split_csv").mkdir(parents=True)
    (root / "pcb1" / "Data" / "Images" / "Normal").mkdir(parents=True)
    (root / "pcb1" / "Data" / "Images" / "Anomaly").mkdir(parents=True)
    (root / "pcb1" / "Data" / "Masks" / "Anomaly").mkdir(parents=True)
    rows = [header]
    for i in range(6):
        label = "anomaly" if i >= 3 else "normal"
        img = f"pcb1/Data/Images/{label.title()}/{i:03d}.JPG"
        _image(root / img)
        mask = ""
        if label == "anomaly":
            mask = f"pcb1/Data/Masks/Anomaly/{i:03d}.png"
            _save_mask(_square(i), root / mask, convention)
        rows.append(sep.join(["pcb1", "test", label, img, mask]))
    rows.append(sep.join(["pcb1", "train", "normal", "pcb1/Data/Images/Normal/000.JPG", ""]))
    text = "\n".join(rows) + "\n"
    (root / "split_csv" / "1cls.csv").write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return root


@pytest.mark.parametrize("convention", ["visa-raw", "palette", "1-bit", "0/255"])
def test_visa_masks_of_every_convention_load_exactly(tmp_path, convention):
    (cat,) = D.visa(_visa_tree(tmp_path, convention))
    assert [s.label for s in cat.samples] == [0, 0, 0, 1, 1, 1]
    assert cat.check() == []
    assert _oracle(cat) == 1.0


def test_read_mask_conventions(tmp_path):
    m = _square(3)
    for conv in ("visa-raw", "palette", "1-bit", "0/255"):
        _save_mask(m, tmp_path / f"{conv.replace('/', '_')}.png", conv)
        np.testing.assert_array_equal(D.read_mask(tmp_path / f"{conv.replace('/', '_')}.png"), m)
    # an anti-aliased 0/255 mask with a threshold of 127 keeps only the solid part
    arr = m.astype(np.uint8) * 255
    arr[0, 0] = 40
    Image.fromarray(arr).save(tmp_path / "aa.png")
    assert D.read_mask(tmp_path / "aa.png")[0, 0] and not D.read_mask(tmp_path / "aa.png", threshold=127)[0, 0]


@pytest.mark.parametrize(
    "variant",
    [
        {"header": "object, split, label, image, mask", "sep": ", "},
        {"header": " object ,split,label ,image,mask ", "sep": " , "},
        {"bom": True},
    ],
)
def test_visa_csv_variants(tmp_path, variant):
    (cat,) = D.visa(_visa_tree(tmp_path, "visa-raw", **variant))
    assert len(cat.samples) == 6 and cat.labels.sum() == 3 and _oracle(cat) == 1.0


def test_visa_csv_problems_all_reported_before_scoring_with_lines(tmp_path):
    root = _visa_tree(tmp_path, "visa-raw")
    csv_path = root / "split_csv" / "1cls.csv"
    lines = csv_path.read_text().splitlines()
    lines[2] = lines[2].replace("001.JPG", "missing.JPG")  # line 3: image file missing
    lines[5] = lines[5].replace("004.png", "gone.png")  # line 6: mask file missing
    lines.append("pcb1,test,weird,pcb1/Data/Images/Normal/000.JPG,")  # line 9: unknown label
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(D.DatasetLayoutError) as err:
        D.visa(root)
    msg = str(err.value)
    assert "3 problems:" in msg
    assert "line 3: image file not found" in msg and "missing.JPG" in msg
    assert "line 6: mask file not found" in msg and "gone.png" in msg
    assert "line 9: unknown label 'weird'" in msg


def test_visa_anomaly_with_empty_mask_field_is_image_level_only(tmp_path):
    root = _visa_tree(tmp_path, "visa-raw")
    csv_path = root / "split_csv" / "1cls.csv"
    lines = csv_path.read_text().splitlines()
    lines[4] = lines[4].rsplit(",", 1)[0] + ","  # line 5 (image 003): anomaly, empty mask field
    csv_path.write_text("\n".join(lines) + "\n")
    (cat,) = D.visa(root)
    assert cat.has_mask.tolist() == [True, True, True, False, True, True]
    warnings = cat.check()
    assert any("line 5" in w and "without a mask field" in w for w in warnings)
    assert any(w.startswith("1 anomalous image(s) without a mask") for w in warnings)
    with pytest.raises(D.DatasetLayoutError, match="anomalous image without a mask"):
        cat.check(require_masks=True)


def _mvtec_like(root, convention: str, with_masks=(True, True, True), gt_suffix="_mask.png"):
    d = root / "screw" / "test"
    (d / "good").mkdir(parents=True)
    (d / "scratch").mkdir()
    for i in range(3):
        _image(d / "good" / f"{i:03d}.png")
    gt = root / "screw" / "ground_truth" / "scratch"
    for i, has in zip(range(3, 6), with_masks, strict=True):
        _image(d / "scratch" / f"{i:03d}.png")
        if has:
            gt.mkdir(parents=True, exist_ok=True)
            _save_mask(_square(i), gt / f"{i:03d}{gt_suffix}", convention)
    return root


@pytest.mark.parametrize("convention", ["0/255", "1-bit", "palette"])
def test_mvtec_and_mpdd_masks(tmp_path, convention):
    (cat,) = D.mvtec(_mvtec_like(tmp_path, convention))
    assert cat.labels.tolist() == [0, 0, 0, 1, 1, 1] and cat.check() == [] and _oracle(cat) == 1.0


def test_btad_masks(tmp_path):
    cat_dir = tmp_path / "01"
    (cat_dir / "test" / "ok").mkdir(parents=True)
    (cat_dir / "test" / "ko").mkdir()
    (cat_dir / "ground_truth" / "ko").mkdir(parents=True)
    for i in range(3):
        _image(cat_dir / "test" / "ok" / f"{i:04d}.bmp")
    for i in range(3, 6):
        _image(cat_dir / "test" / "ko" / f"{i:04d}.bmp")
        Image.fromarray(_square(i).astype(np.uint8) * 255).save(cat_dir / "ground_truth" / "ko" / f"{i:04d}.png")
    (cat,) = D.btad(tmp_path)
    assert cat.labels.tolist() == [0, 0, 0, 1, 1, 1] and _oracle(cat) == 1.0


def test_mvtec_anomalies_without_masks_are_kept_for_image_metrics(tmp_path):
    (cat,) = D.mvtec(_mvtec_like(tmp_path, "0/255", with_masks=(True, False, True)))
    assert cat.has_mask.tolist() == [True, True, True, True, False, True]
    assert cat.check() == [
        "1 anomalous image(s) without a mask: scored and counted in the image metrics, left out of the pixel metrics"
    ]
    with pytest.raises(D.DatasetLayoutError, match="anomalous image without a mask"):
        cat.check(require_masks=True)
    # a defect folder with no ground_truth folder at all
    (cat,) = D.mvtec(_mvtec_like(tmp_path / "b", "0/255", with_masks=(False, False, False)))
    assert not cat.has_mask[3:].any()


def test_all_masks_empty_is_an_error_before_scoring(tmp_path):
    root = _mvtec_like(tmp_path, "0/255")
    for f in (root / "screw" / "ground_truth" / "scratch").iterdir():
        Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(f)
    (cat,) = D.mvtec(root)
    with pytest.raises(D.DatasetLayoutError, match="all 3 masks of category 'screw' are empty"):
        cat.check()


def test_eval_counts_images_without_masks_and_reports_undefined_pixel_metrics(tmp_path, tiny_backbone, monkeypatch):
    """Image metrics use all images; pixel metrics only those with masks; undefined ones are a counted warning."""
    import dualclip.evaluation as E
    from dualclip.data.synthetic import make_texture_set
    from dualclip.metrics import all_metrics

    root = write_mvtec_tree(tmp_path / "mv", make_texture_set(4, 4, 64, seed=1), "tex", "hole", no_mask=(5,))
    (cat,) = D.mvtec(root)
    real = E.DualClipDetector
    monkeypatch.setattr(E, "DualClipDetector", lambda cfg, backbone=None: real(cfg, backbone=tiny_backbone))
    cfg = DetectorConfig(pretrained=None, progress=False)
    res = run_eval(cfg, [cat], [0], tmp_path / "out", warn=lambda m: None)
    r = res["categories"]["tex"]
    assert r["n_without_mask"] == 1 and r["n_images"] == 8
    direct = real(cfg, backbone=tiny_backbone).score_images(cat.images(), class_name="tex")
    keep = cat.has_mask
    want = all_metrics(cat.labels, direct.image_scores.numpy())
    want_px = all_metrics(
        np.array([0, 1]), np.array([0.0, 1.0]), cat.masks(direct.maps.shape[-1])[keep], direct.maps.numpy()[keep]
    )
    assert r["image_auroc"] == pytest.approx(want["image_auroc"])
    assert r["pixel_auroc"] == pytest.approx(want_px["pixel_auroc"])
    assert r["pixel_aupro"] == pytest.approx(want_px["pixel_aupro"])
    assert res["n_warnings"] == 1
    # no mask at all: pixel metrics undefined -> a counted warning in results.json and results.md, valid JSON
    for g in (root / "tex" / "ground_truth" / "hole").iterdir():
        g.unlink()
    (cat,) = D.mvtec(root)
    res = run_eval(cfg, [cat], [0], tmp_path / "out2", warn=lambda m: None)
    saved = json.loads((tmp_path / "out2" / "results.json").read_text())
    assert saved["categories"]["tex"]["pixel_auroc"] is None and saved["n_warnings"] == 2
    assert any("pixel metrics undefined" in w for w in saved["warnings"]["tex"])
    md = (tmp_path / "out2" / "results.md").read_text()
    assert "**Warnings (2)**" in md and "pixel metrics undefined" in md


def _images_and_masks_tree(root):
    """An images/ + masks/ split under test/ (as MPDD's data_supervised copy): no good/ folder."""
    test = root / "plate" / "test"
    for i in range(4):
        for sub in ("images", "masks"):
            (test / sub).mkdir(parents=True, exist_ok=True)
        _image(test / "images" / f"{i:03d}.png")
        Image.fromarray((_square(i) if i >= 2 else np.zeros((SIZE, SIZE), bool)).astype(np.uint8) * 255).save(
            test / "masks" / f"{i:03d}.png"
        )
    return root


def test_mvtec_layout_never_reads_a_mask_folder_and_points_to_the_folder_layout(tmp_path):
    root = _images_and_masks_tree(tmp_path)
    with pytest.raises(D.DatasetLayoutError) as err:
        D.mvtec(root)
    test = root / "plate" / "test"
    assert f"{test} holds images/ and the mask folder masks/" in str(err.value)
    assert f"dataset=folder images={test / 'images'} masks={test / 'masks'}" in str(err.value)
    # the folder layout the message points to reads it: labels from the masks
    (cat,) = D.folder("plate", images=[str(test / "images")], mask_dirs=[str(test / "masks")])
    assert cat.labels.tolist() == [0, 0, 1, 1] and cat.check() == []
    # beside a good/ folder, a stray masks/ folder is left out with a note, never scored as a defect type
    root = _mvtec_like(tmp_path / "b", "0/255")
    (root / "screw" / "test" / "masks").mkdir()
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(root / "screw" / "test" / "masks" / "000.png")
    (cat,) = D.mvtec(root)
    assert cat.defects == ["scratch"] and len(cat.samples) == 6
    assert cat.check() == [f"{root / 'screw' / 'test' / 'masks'} is a mask folder: not read as images"]


def test_a_category_without_normal_images_is_refused_before_scoring(tmp_path):
    root = _mvtec_like(tmp_path, "0/255")
    for f in (root / "screw" / "test" / "good").iterdir():
        f.unlink()
    (cat,) = D.mvtec(root)
    with pytest.raises(D.DatasetLayoutError, match=r"category 'screw': no normal \(defect-free\) test image"):
        cat.check()
    (cat,) = D.folder("f", anomalous=[str(root / "screw" / "test" / "scratch")])
    with pytest.raises(D.DatasetLayoutError, match="no normal"):
        cat.check()


def test_folder_layout_names_a_defect_type_by_the_folder_above_a_plain_image_folder(tmp_path):
    from PIL import Image

    for kind in ("MT_Blowhole", "MT_Fray"):
        (tmp_path / kind / "Imgs").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / kind / "Imgs" / f"{kind}_1.jpg")
    (tmp_path / "scratch").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "scratch" / "a.png")
    patterns = [str(tmp_path / "MT_Blowhole" / "Imgs"), str(tmp_path / "MT_Fray" / "Imgs"), str(tmp_path / "scratch")]
    (cat,) = D.folder("tile", anomalous=patterns)
    assert sorted(s.defect for s in cat.samples) == ["MT_Blowhole", "MT_Fray", "scratch"]
    assert cat.defects == ["MT_Blowhole", "MT_Fray", "scratch"]


def test_folder_layout_leaves_the_masks_beside_their_images_out_of_the_images(tmp_path):
    """magnetic_tile keeps ``x.jpg`` beside its mask ``x.png``: the masks are masks, not images to score."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for kind, n in (("MT_Free", 3), ("MT_Crack", 2)):
        d = tmp_path / kind / "Imgs"
        d.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / f"{kind}_{i}.jpg")
            mask = np.zeros((16, 16), np.uint8)
            if kind == "MT_Crack":
                mask[4:8, 2:12] = 255
            Image.fromarray(mask).save(d / f"{kind}_{i}.png")
    free, crack = str(tmp_path / "MT_Free" / "Imgs"), str(tmp_path / "MT_Crack" / "Imgs")
    (cat,) = D.folder("tile", normal=[free], anomalous=[crack])
    assert [s.path.name for s in cat.samples] == [
        "MT_Free_0.jpg",
        "MT_Free_1.jpg",
        "MT_Free_2.jpg",
        "MT_Crack_0.jpg",
        "MT_Crack_1.jpg",
    ]
    assert [s.mask.name if s.mask else None for s in cat.samples] == [None] * 3 + ["MT_Crack_0.png", "MT_Crack_1.png"]
    assert cat.notes == [
        f"{free}: 3 mask file(s) beside their images (same name, binary) left out of the images, e.g. MT_Free_0.png",
        f"{crack}: 2 mask file(s) beside their images (same name, binary) left out of the images, e.g. MT_Crack_0.png",
    ]
    (labelled,) = D.folder("tile", images=[free, crack])  # labels from the masks: the same images
    assert [(s.path.name, s.label) for s in labelled.samples] == [(s.path.name, s.label) for s in cat.samples]
