"""Tests of `fscs shards folder`: labels CSV / ImageFolder, mask formats, novel split, every bad input."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fscs.cli import main
from fscs.data.episodes import EpisodeSampler
from fscs.data.stream import TrainEpisodeStream
from fscs.data.shards import load_samples, read_index
from fscs.data.sources.folder import BASE_FOLD, NOVEL_FOLD, build_folder_shards
from fscs.data.sources.folder_plan import choose_novel, make_keys
from fscs.errors import FSCSError

W, H = 32, 24


def _img(path: Path, seed: int, size: tuple[int, int] = (W, H)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _dataset(root: Path, rows: dict[str, str]) -> tuple[Path, Path]:
    """Write one random image per row (file -> 'a;b') and labels.csv; returns (images dir, csv)."""
    images = root / "images"
    for i, name in enumerate(rows):
        _img(images / name, i)
    csv = root / "labels.csv"
    csv.write_text("image,labels\n" + "".join(f'"{n}",{lab}\n' for n, lab in rows.items()))
    return images, csv


def _rows(per_class: int = 4) -> dict[str, str]:
    """Classes a, b, c (base) and d (novel); some images multi-label (with ';' and '|' separators)."""
    rows = {}
    for c in "abcd":
        for i in range(per_class):
            rows[f"{c}/{c}{i}.png"] = c
    rows["mix/ab0.png"] = "a;b"
    rows["mix/bc0.png"] = "b|c"
    rows["mix/ad0.png"] = "a;d"
    return rows


def test_csv_multilabel_novel_split(tmp_path):
    images, csv = _dataset(tmp_path, _rows())
    out = build_folder_shards(images, tmp_path / "shards", labels=csv, novel=["d"], select_fraction=0.2,
                              seed=3)
    index = read_index(out)
    assert index.class_names == {1: "a", 2: "b", 3: "c", 4: "d"}
    assert index.folds == {NOVEL_FOLD: [4], BASE_FOLD: [1, 2, 3]}
    assert index.samples["mix_ab0"]["labels"] == [1, 2] and index.samples["mix_bc0"]["labels"] == [2, 3]
    # every image showing the novel class is a test image, never trained on
    tested = {k for k, s in index.samples.items() if s["split"] == "test"}
    assert tested == {"d_d0", "d_d1", "d_d2", "d_d3", "mix_ad0"}
    train = index.fold_entries("train", 0)
    select = index.fold_entries("select", 0)
    test = index.fold_entries("test", 0)
    assert {c for _, c in train} == {1, 2, 3} and {c for _, c in test} == {4}
    assert len(test) == 5 and ("mix_ad0", 4) in test and ("mix_ad0", 1) not in test + train + select
    assert not {k for k, _ in train} & {k for k, _ in select}
    assert len({k for k, _ in select}) == round(0.2 * 14)
    assert index.fold_classes("train", 0) == [1, 2, 3] and index.fold_classes("test", 0) == [4]
    spec = EpisodeSampler(index, "test", 0, way=1, shot=1, seed=0).episode(0)
    assert spec.classes == (4,) and spec.query not in spec.support[0]
    stream = TrainEpisodeStream(out, fold=0, way=1, shot=1, image_size=32, seed=0, use_masks=False)
    assert stream.train_classes == [1, 2, 3] and "d_d0" not in stream.allowed


def test_rebuild_is_cached_and_edited_labels_are_refused(tmp_path):
    images, csv = _dataset(tmp_path, _rows(3))
    out = build_folder_shards(images, tmp_path / "s", labels=csv, novel=["d"])
    mtime = (out / "index.json").stat().st_mtime_ns
    assert build_folder_shards(images, tmp_path / "s", labels=csv, novel=["d"]) == out
    assert (out / "index.json").stat().st_mtime_ns == mtime
    csv.write_text(csv.read_text().replace('"a/a0.png",a', '"a/a0.png",a;b'))
    with pytest.raises(FSCSError, match="delete it or pass another --out"):
        build_folder_shards(images, tmp_path / "s", labels=csv, novel=["d"])


def test_image_folder_layout_and_seeded_novel_choice(tmp_path):
    for c in ("cat", "dog", "fox", "owl", "yak", "emu"):
        for i in range(3):
            _img(tmp_path / "imgs" / c / f"{i}.jpg", hash((c, i)) % 1000)
    out = build_folder_shards(tmp_path / "imgs", tmp_path / "s", novel_count=2, seed=5, select_fraction=0)
    index = read_index(out)
    assert list(index.class_names.values()) == ["cat", "dog", "emu", "fox", "owl", "yak"]
    novel = choose_novel(list(index.class_names.values()), None, 2, 5)
    assert [index.class_names[c] for c in index.folds[0]] == novel and len(novel) == 2
    assert all(len(s["labels"]) == 1 for s in index.samples.values()) and len(index.samples) == 18
    assert choose_novel(list("abcdef"), None, None, 0) == choose_novel(list("abcdef"), None, 2, 0)
    assert choose_novel(list("abcdef"), None, 0, 0) == []
    assert index.samples["cat_0"]["split"] in ("trn", "test")


def test_index_png_masks_and_max_side(tmp_path):
    rows = _rows(3)
    images, csv = _dataset(tmp_path, rows)
    masks = tmp_path / "masks"
    (masks / "mix").mkdir(parents=True)
    m = np.zeros((H, W), np.uint8)
    m[2:10, 2:12], m[12:20, 14:30], m[0:2, :] = 1, 2, 255  # a, b, ignore band
    Image.fromarray(m, "L").save(masks / "mix" / "ab0.png")
    out = build_folder_shards(images, tmp_path / "s", labels=csv, masks=masks, novel=["d"], max_side=16)
    index = read_index(out)
    sample = load_samples(index, {"mix_ab0", "a_a0"})
    got = sample["mix_ab0"].mask
    assert sample["a_a0"].mask is None
    assert sample["mix_ab0"].image.shape == (12, 16, 3) and got.shape == (12, 16)
    assert set(np.unique(got)) == {0, 1, 2, 255}
    assert got[3, 3] == 1 and got[8, 10] == 2


def test_partly_masked_novel_images_are_all_tested(tmp_path, caplog):
    images, csv = _dataset(tmp_path, _rows(3))
    (tmp_path / "masks" / "d").mkdir(parents=True)
    for name in ("d0", "d1"):
        m = np.zeros((H, W), np.uint8)
        m[3:9, 3:9] = 4
        Image.fromarray(m, "L").save(tmp_path / "masks" / "d" / f"{name}.png")
    with caplog.at_level(logging.WARNING, logger="fscs.data.sources"):
        out = build_folder_shards(images, tmp_path / "s", labels=csv, masks=tmp_path / "masks", novel=["d"])
    index = read_index(out)
    # every novel image is a test query (ER from its labels); the masked ones also give mIoU
    assert index.fold_entries("test", 0) == [("d_d0", 4), ("d_d1", 4), ("d_d2", 4), ("mix_ad0", 4)]
    samples = load_samples(index, {"d_d0", "d_d2"})
    assert samples["d_d0"].mask is not None and samples["d_d2"].mask is None
    assert "2 of 4 novel test images have masks" in caplog.text and "ER over all" in caplog.text
    assert "novel class" not in caplog.text  # d has masked images
    assert "class 'd' has 4 novel test images; 5-shot episodes need 6" in caplog.text  # all 4 counted
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fscs.data.sources"):
        build_folder_shards(images, tmp_path / "s2", labels=csv, masks=tmp_path / "masks", novel=["c", "d"])
    assert "novel class 'c' has no masked test image" in caplog.text


def test_unmasked_novel_images_are_tested_for_er(tmp_path, caplog):
    images, csv = _dataset(tmp_path, _rows(3))
    with caplog.at_level(logging.WARNING, logger="fscs.data.sources"):
        out = build_folder_shards(images, tmp_path / "s", labels=csv, novel=["d"])
    index = read_index(out)
    assert [k for k, _ in index.fold_entries("test", 0)] == ["d_d0", "d_d1", "d_d2", "mix_ad0"]
    assert "reports ER (classification) only" in caplog.text


def test_per_class_binary_masks_with_overlap(tmp_path):
    images, csv = _dataset(tmp_path, _rows(3))
    d = tmp_path / "masks" / "mix" / "ab0"
    d.mkdir(parents=True)
    a, b = np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8)
    a[0:10, 0:10], b[5:15, 5:15] = 255, 1
    Image.fromarray(a).save(d / "a.png")
    Image.fromarray(b).save(d / "b.png")
    out = build_folder_shards(images, tmp_path / "s", labels=csv, masks=tmp_path / "masks", novel=["d"])
    mask = load_samples(read_index(out), {"mix_ab0"})["mix_ab0"].mask
    assert mask[1, 1] == 1 and mask[12, 12] == 2 and mask[7, 7] == 255 and mask[20, 30] == 0


def test_binary_mask_format_for_single_label_images(tmp_path):
    for c in ("p", "q", "r"):
        for i in range(3):
            _img(tmp_path / "imgs" / c / f"{i}.png", i)
    fg = np.zeros((H, W), np.uint8)
    fg[4:8, 4:8] = 255
    (tmp_path / "masks" / "q").mkdir(parents=True)
    Image.fromarray(fg).save(tmp_path / "masks" / "q" / "1.png")
    out = build_folder_shards(tmp_path / "imgs", tmp_path / "s", masks=tmp_path / "masks",
                              mask_format="binary", novel=["r"])
    mask = load_samples(read_index(out), {"q_1"})["q_1"].mask
    assert set(np.unique(mask)) == {0, 2} and mask[5, 5] == 2


def test_keys_are_sanitised_and_unique():
    keys = make_keys(["my photo (1).jpg", "a/b.png", "a_b.jpg", "x.png"])
    assert keys[0] == "my_photo_1" and keys[3] == "x"
    assert keys[1] != keys[2] and keys[1].startswith("a_b-")


def test_few_images_warns(tmp_path, caplog):
    images, csv = _dataset(tmp_path, _rows(2))
    with caplog.at_level(logging.WARNING, logger="fscs.data.sources"):
        build_folder_shards(images, tmp_path / "s", labels=csv, novel=["d"], shots=(1, 5))
    assert "class 'd' has 3 novel test images; 5-shot episodes need 6" in caplog.text
    assert "have no mask" in caplog.text


def _mask_case(tmp_path: Path, values: dict[str, int], name: str = "mix/ab0.png", shape=(H, W), mode="L"):
    images, csv = _dataset(tmp_path, _rows(3))
    path = tmp_path / "masks" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGB":
        Image.fromarray(np.zeros((*shape, 3), np.uint8)).save(path)
    else:
        m = np.zeros(shape, np.uint8)
        for i, v in enumerate(values.values()):
            m[i, :] = v
        Image.fromarray(m, "L").save(path)
    return images, csv, tmp_path / "masks"


@pytest.mark.parametrize("case,match", [
    ("missing_image", r"labels.csv line 2: image 'a/nope.png' not found under"),
    ("unreadable", r"a0.png: unreadable image"),
    ("no_images_class", r"class 'zebra' has no images"),
    ("mask_size", r"ab0.png: mask is 10x5 but image .*ab0.png is 32x24"),
    ("mask_unknown_value", r"ab0.png: value 9 is not a class id"),
    ("mask_unlabelled_class", r"ab0.png: contains class 'c' \(id 3\), not labelled"),
    ("mask_rgb", r"ab0.png: mask mode RGB is not an index PNG"),
    ("mask_binary_as_index", r"ab0.png: only 0 and 255 \(ignore\), no pixel of a/b; a binary mask .* needs "
                             r"--mask-format binary"),
    ("binary_unknown_class", r"zebra.png: 'zebra' is not a class"),
    ("binary_missing_class", r"no b.png although ab0.png is labelled 'b'"),
    ("no_header", r"labels.csv: first line must be the header"),
    ("latin1_csv", r"labels.csv: not UTF-8 text .*; save the labels as CSV UTF-8"),
    ("duplicate_row", r"is listed again"),
    ("too_many_fields", r"3 fields, header has 2"),
    ("novel_unknown", r"--novel 'zebra' is not a class"),
    ("novel_all", r"leave at least one class for training"),
    ("empty_class_folder", r"class folder 'empty' has no images"),
    ("negative_max_side", r"--max-side -5: must be >= 0"),
])
def test_bad_inputs_raise_one_line_errors(tmp_path, case, match):
    kwargs: dict = {"novel": ["d"]}
    if case == "empty_class_folder":
        _img(tmp_path / "imgs" / "full" / "0.png", 0)
        (tmp_path / "imgs" / "empty").mkdir()
        images, csv = tmp_path / "imgs", None
        kwargs = {}
    elif case.startswith("mask_"):
        spec = {"mask_size": ({}, (5, 10), "L"), "mask_unknown_value": ({"x": 9}, (H, W), "L"),
                "mask_unlabelled_class": ({"x": 3}, (H, W), "L"), "mask_rgb": ({}, (H, W), "RGB"),
                "mask_binary_as_index": ({"x": 255}, (H, W), "L")}[case]
        images, csv, masks = _mask_case(tmp_path, spec[0], shape=spec[1], mode=spec[2])
        kwargs["masks"] = masks
    elif case.startswith("binary_"):
        images, csv = _dataset(tmp_path, _rows(3))
        d = tmp_path / "masks" / "mix" / "ab0"
        d.mkdir(parents=True)
        Image.fromarray(np.zeros((H, W), np.uint8)).save(d / "a.png")
        if case == "binary_unknown_class":
            Image.fromarray(np.zeros((H, W), np.uint8)).save(d / "zebra.png")
        kwargs["masks"] = tmp_path / "masks"
    else:
        images, csv = _dataset(tmp_path, _rows(3))
        text = csv.read_text()
        if case == "missing_image":
            csv.write_text(text.replace('"a/a0.png"', '"a/nope.png"'))
        elif case == "unreadable":
            (images / "a" / "a0.png").write_bytes(b"not an image at all")
        elif case == "no_images_class":
            kwargs["classes"] = ["a", "b", "c", "d", "zebra"]
        elif case == "latin1_csv":
            csv.write_bytes(text.replace("\n", "\n\"a/a1.png\",caf\xe9\n", 1).encode("latin-1"))  # Excel's cp1252
        elif case == "no_header":
            csv.write_text(text.split("\n", 1)[1])
        elif case == "duplicate_row":
            csv.write_text(text + '"a/a0.png",b\n')
        elif case == "too_many_fields":
            csv.write_text(text + "a/a1.png,a,b\n")
        elif case == "negative_max_side":
            kwargs["max_side"] = -5
        elif case == "novel_unknown":
            kwargs["novel"] = ["zebra"]
        elif case == "novel_all":
            kwargs["novel"] = ["a", "b", "c", "d"]
    with pytest.raises(FSCSError, match=match) as info:
        build_folder_shards(images, tmp_path / "out", labels=csv, **kwargs)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_cli_shards_folder(tmp_path, capsys):
    images, csv = _dataset(tmp_path, _rows(3))
    assert main(["shards", "folder", "--images", str(images), "--labels", str(csv), "--novel", "d",
                 "--out", str(tmp_path / "s")]) == 0
    assert "shards ready" in capsys.readouterr().out
    assert read_index(tmp_path / "s").folds[0] == [4]
    csv.write_text(csv.read_text().replace('"a/a0.png"', '"a/missing.png"'))
    assert main(["shards", "folder", "--images", str(images), "--labels", str(csv),
                 "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fscs shards: error: labels.csv line") and "\n" not in err


def test_unchanged_images_are_stored_byte_for_byte(tmp_path):
    """PNG/JPEG files used as they are go into the shards unchanged (no JPEG re-encoding of the pixels);
    EXIF-rotated or downscaled ones are re-encoded, and every stored image decodes to the converted pixels."""
    import tarfile

    rows = _rows()
    images, csv = _dataset(tmp_path, rows)
    big = np.random.default_rng(9).integers(0, 255, (H, 3 * W, 3), dtype=np.uint8)
    Image.fromarray(big).save(images / "a" / "a0.png")  # wider than max_side below: downscaled
    rotated = Image.fromarray(np.random.default_rng(8).integers(0, 255, (H, W, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees" on display
    rotated.save(images / "a" / "a1.jpg", exif=exif, quality=90)
    (images / "a" / "a1.png").unlink()
    csv.write_text(csv.read_text().replace("a/a1.png", "a/a1.jpg"))
    Image.fromarray(np.random.default_rng(7).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(
        images / "b" / "b1.jpg", quality=90)
    (images / "b" / "b1.png").unlink()
    csv.write_text(csv.read_text().replace("b/b1.png", "b/b1.jpg"))
    out = build_folder_shards(images, tmp_path / "s", labels=csv, novel=["d"], max_side=2 * W)
    members = {}
    for tar in out.glob("*.tar"):
        with tarfile.open(tar) as tf:
            members.update({m.name: tf.extractfile(m).read() for m in tf.getmembers()})
    assert members["b_b0.png"] == (images / "b" / "b0.png").read_bytes()  # PNG kept
    assert members["b_b1.jpg"] == (images / "b" / "b1.jpg").read_bytes()  # JPEG kept, not re-encoded
    assert "a_a0.jpg" in members and "a_a0.png" not in members  # downscaled: re-encoded
    assert "a_a1.jpg" in members and members["a_a1.jpg"] != (images / "a" / "a1.jpg").read_bytes()  # rotated
    samples = load_samples(read_index(out), {"a_a1", "b_b0"})
    assert samples["a_a1"].image.shape == (W, H, 3)  # upright after the EXIF rotation
    np.testing.assert_array_equal(samples["b_b0"].image, np.asarray(Image.open(images / "b" / "b0.png")))


def test_a_blank_mask_is_no_mask(tmp_path, caplog):
    """An all-0 (or all-255) mask of a labelled image, as annotation tools export for images not yet drawn,
    does not turn its objects into background: the image is stored unmasked, with a warning."""
    images, csv = _dataset(tmp_path, _rows(3))
    (tmp_path / "masks" / "d").mkdir(parents=True)
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "masks" / "d" / "d0.png")
    Image.fromarray(np.full((H, W), 255, np.uint8)).save(tmp_path / "masks" / "d" / "d1.png")
    drawn = np.zeros((H, W), np.uint8)
    drawn[2:6, 2:6] = 4
    Image.fromarray(drawn).save(tmp_path / "masks" / "d" / "d2.png")
    with caplog.at_level(logging.WARNING, logger="fscs.data.sources"):
        out = build_folder_shards(images, tmp_path / "s", labels=csv, masks=tmp_path / "masks", novel=["d"])
    index = read_index(out)
    assert [index.samples[k]["mask"] for k in ("d_d0", "d_d1", "d_d2")] == [False, False, True]
    assert "d0.png: no pixel of d (labelled for d0.png); stored without a mask" in caplog.text


def test_masks_with_an_upper_case_extension_are_found(tmp_path):
    images, csv = _dataset(tmp_path, _rows(3))
    (tmp_path / "masks" / "d").mkdir(parents=True)
    drawn = np.zeros((H, W), np.uint8)
    drawn[2:6, 2:6] = 4
    Image.fromarray(drawn).save(tmp_path / "masks" / "d" / "d0.PNG", format="PNG")
    per_class = tmp_path / "masks" / "mix" / "ad0"
    per_class.mkdir(parents=True)
    for c, shift in (("a", 0), ("d", 8)):
        Image.fromarray(np.roll(drawn > 0, shift, axis=1).astype(np.uint8) * 255).save(per_class / f"{c}.PNG",
                                                                                       format="PNG")
    out = build_folder_shards(images, tmp_path / "s", labels=csv, masks=tmp_path / "masks", novel=["d"])
    index = read_index(out)
    assert index.samples["d_d0"]["mask"] and index.samples["mix_ad0"]["mask"]


def test_a_masks_folder_inside_an_image_folder_is_not_a_class(tmp_path):
    """photos/<class>/*.png with --masks photos/masks: the masks are masks, not images of a class 'masks'."""
    fg = np.zeros((H, W), np.uint8)
    fg[4:8, 4:8] = 255
    for c in ("p", "q", "r"):
        for i in range(3):
            _img(tmp_path / "photos" / c / f"{i}.png", i)
            (tmp_path / "photos" / "masks" / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(fg).save(tmp_path / "photos" / "masks" / c / f"{i}.png")
    out = build_folder_shards(tmp_path / "photos", tmp_path / "s", masks=tmp_path / "photos" / "masks",
                              mask_format="binary", novel=["r"])
    index = read_index(out)
    assert list(index.class_names.values()) == ["p", "q", "r"]
    assert len(index.samples) == 9 and all(s["mask"] for s in index.samples.values())


def test_mask_warnings_count_the_masks_stored_not_the_blank_files(tmp_path, caplog):
    """Blank mask files (dropped when read) do not count as masks in the 'N of M have masks' warnings."""
    images, csv = _dataset(tmp_path, _rows(3))
    (tmp_path / "masks" / "d").mkdir(parents=True)
    drawn = np.zeros((H, W), np.uint8)
    drawn[2:6, 2:6] = 4
    Image.fromarray(drawn).save(tmp_path / "masks" / "d" / "d0.png")
    for name in ("d1", "d2"):  # exported by an annotation tool before anyone drew on them
        Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "masks" / "d" / f"{name}.png")
    for out in ("s", "s"):  # built, then reused: the same count both times
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fscs.data.sources"):
            build_folder_shards(images, tmp_path / out, labels=csv, masks=tmp_path / "masks", novel=["d"])
        assert "1 of 15 images have masks" in caplog.text
        assert "1 of 4 novel test images have masks" in caplog.text
    caplog.clear()
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "masks" / "d" / "d0.png")
    with caplog.at_level(logging.WARNING, logger="fscs.data.sources"):
        build_folder_shards(images, tmp_path / "s2", labels=csv, masks=tmp_path / "masks", novel=["d"])
    assert "have masks" not in caplog.text and "the 4 novel test images have no masks" in caplog.text


def test_binary_masks_drawn_in_the_alpha_channel_are_read_like_predict_reads_them(tmp_path):
    """A per-class binary mask whose object exists only in its alpha channel is that object (as for
    `fscs predict` support masks), not an empty mask."""
    from fscs.data.transforms import mask_foreground

    images, csv = _dataset(tmp_path, _rows(3))
    d = tmp_path / "masks" / "mix" / "ab0"
    d.mkdir(parents=True)
    for c, rows in (("a", slice(0, 8)), ("b", slice(12, 20))):
        rgba = np.full((H, W, 4), 255, np.uint8)
        rgba[..., 3] = 0
        rgba[rows, 4:12] = (0, 0, 0, 255)  # black on a transparent white layer
        Image.fromarray(rgba, "RGBA").save(d / f"{c}.png")
    out = build_folder_shards(images, tmp_path / "s", labels=csv, masks=tmp_path / "masks", novel=["d"])
    mask = load_samples(read_index(out), {"mix_ab0"})["mix_ab0"].mask
    assert (mask == 1).sum() == 64 and (mask == 2).sum() == 64 and mask[2, 6] == 1 and mask[14, 6] == 2
    with Image.open(d / "a.png") as im:
        assert np.array_equal(mask_foreground(im), (mask == 1).astype(np.uint8))


def test_an_image_folder_class_with_a_comma_can_be_named_escaped(tmp_path, capsys):
    """ImageFolder class `nuts, bolts`: `--novel 'nuts\\, bolts'` names it; the plain form is refused with
    the escape in the error (it would be two names)."""
    for c in ("nuts, bolts", "gears", "springs"):
        for i in range(3):
            _img(tmp_path / "photos" / c / f"{i}.png", i)
    common = ["shards", "folder", "--images", str(tmp_path / "photos"), "--out", str(tmp_path / "s")]
    assert main([*common, "--novel", "nuts, bolts"]) != 0
    assert r"a comma inside a class name is written \, (e.g. 'nuts\, bolts')" in capsys.readouterr().err
    assert main([*common, "--novel", r"nuts\, bolts", "--classes", r"springs,nuts\, bolts,gears"]) == 0
    index = read_index(tmp_path / "s")
    assert index.class_names == {1: "springs", 2: "nuts, bolts", 3: "gears"}
    assert index.folds[NOVEL_FOLD] == [2]


def test_a_mask_drawn_on_the_image_as_stored_not_upright_is_named_as_such(tmp_path):
    """Masks match the upright (EXIF-rotated) image; a mask with the stored, unrotated size says so."""
    images, csv = _dataset(tmp_path, _rows(3))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees: upright it is H wide and W high
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(images / "d" / "d0.jpg", exif=exif)
    (images / "d" / "d0.png").unlink()
    csv.write_text(csv.read_text().replace("d/d0.png", "d/d0.jpg"))
    (tmp_path / "masks" / "d").mkdir(parents=True)
    stored = np.zeros((H, W), np.uint8)
    stored[2:6, 2:6] = 4
    Image.fromarray(stored).save(tmp_path / "masks" / "d" / "d0.png")
    with pytest.raises(FSCSError, match=r"d0.png: mask is 32x24 but image .* is 24x32 .* masks match the "
                                        r"upright image \(EXIF orientation applied\)"):
        build_folder_shards(images, tmp_path / "s", labels=csv, masks=tmp_path / "masks", novel=["d"])


def test_images_over_pillows_limit_are_converted_downscaled_with_their_masks(tmp_path, monkeypatch):
    """Pillow refuses images over ~179 MP (here: over 600 pixels); they are read downscaled to --max-side,
    their full-size masks brought to the same size. One over fscs's read limit is a one-line error with
    its size and a fix that works (not 're-save it as JPEG/PNG')."""
    import fscs.data.transforms as tr

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    monkeypatch.setattr(tr, "PIL_LIMIT_PIXELS", 600)
    monkeypatch.setattr(tr, "MAX_READ_PIXELS", 5000)
    images, csv = _dataset(tmp_path, _rows(3))
    (tmp_path / "masks" / "d").mkdir(parents=True)
    drawn = np.zeros((H, W), np.uint8)
    drawn[:, : W // 2] = 4
    Image.fromarray(drawn).save(tmp_path / "masks" / "d" / "d0.png")
    out = build_folder_shards(images, tmp_path / "s", labels=csv, masks=tmp_path / "masks", novel=["d"],
                              max_side=16)
    got = load_samples(read_index(out), {"d_d0", "a_a0"})
    assert got["d_d0"].image.shape == (12, 16, 3) and got["a_a0"].image.shape == (12, 16, 3)
    assert got["d_d0"].mask.shape == (12, 16) and (got["d_d0"].mask[:, :8] == 4).all()
    assert (got["d_d0"].mask[:, 8:] == 0).all()
    with pytest.raises(FSCSError, match=r"a0.png: 32x24 pixels is over .* --max-side"):
        build_folder_shards(images, tmp_path / "s1", labels=csv, novel=["d"], max_side=0)  # kept as it is
    # a --max-side above the image's longer side keeps it as it is too: refused, not stored undecodable
    with pytest.raises(FSCSError, match=r"a0.png: 32x24 pixels is over .* --max-side"):
        build_folder_shards(images, tmp_path / "s3", labels=csv, novel=["d"], max_side=40)
    with pytest.raises(FSCSError, match=r"a0.png: 32x24 pixels \(stored at 30x22\) is over"):
        build_folder_shards(images, tmp_path / "s4", labels=csv, novel=["d"], max_side=30)
    _img(images / "a" / "a0.png", 0, size=(100, 80))  # 8000 pixels: over the read limit
    with pytest.raises(FSCSError) as err:
        build_folder_shards(images, tmp_path / "s2", labels=csv, novel=["d"], max_side=16)
    msg = str(err.value)
    assert "a0.png: 100x80 pixels" in msg and "downscale it" in msg and "re-save" not in msg
    assert "\n" not in msg


def test_an_image_folder_laid_out_like_predict_support_does_not_take_its_masks_as_images(tmp_path):
    """photos/<class>/masks/<stem>.png (fscs predict's support layout) are masks of <class>/<stem>.*, not
    training images of <class>; like <stem>.mask.png, which was already skipped."""
    for c in ("p", "q", "r"):
        for i in range(3):
            _img(tmp_path / "photos" / c / f"{i}.png", i)
    _img(tmp_path / "photos" / "p" / "masks" / "0.png", 9)
    _img(tmp_path / "photos" / "q" / "1.mask.png", 9)
    _img(tmp_path / "photos" / "r" / "masks" / "face.png", 9)  # no r/face.*: a photo in a folder 'masks'
    out = build_folder_shards(tmp_path / "photos", tmp_path / "s", novel=["r"])
    assert sorted(read_index(out).samples) == ["p_0", "p_1", "p_2", "q_0", "q_1", "q_2", "r_0", "r_1", "r_2",
                                               "r_masks_face"]


def test_a_masks_folder_deeper_inside_an_image_folder_is_not_read_as_images(tmp_path):
    """--masks photos/annotations/masks: 'annotations' is no class of mask images."""
    fg = np.zeros((H, W), np.uint8)
    fg[4:8, 4:8] = 255
    masks = tmp_path / "photos" / "annotations" / "masks"
    for c in ("p", "q", "r"):
        for i in range(3):
            _img(tmp_path / "photos" / c / f"{i}.png", i)
            (masks / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(fg).save(masks / c / f"{i}.png")
    out = build_folder_shards(tmp_path / "photos", tmp_path / "s", masks=masks, mask_format="binary",
                              novel=["r"])
    index = read_index(out)
    assert list(index.class_names.values()) == ["p", "q", "r"]
    assert len(index.samples) == 9 and all(s["mask"] for s in index.samples.values())
