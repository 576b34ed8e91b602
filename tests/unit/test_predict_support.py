"""fscs predict's support side: mask files (grey, alpha-only, empty) and the on-disk feature cache."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from fscs.data.transforms import mask_foreground
from fscs.predict_inputs import _support_mask
from fscs.predict_model import FeatureCache


def test_mask_pixels_grey_alpha_and_empty(tmp_path, caplog):
    obj = np.zeros((6, 8), dtype=np.uint8)
    obj[2:4, 3:6] = 1
    assert np.array_equal(mask_foreground(Image.fromarray(obj * 255)), obj)
    alpha_only = np.zeros((6, 8, 4), dtype=np.uint8)  # black everywhere, the object drawn in transparency
    alpha_only[..., 3] = obj * 255
    assert np.array_equal(mask_foreground(Image.fromarray(alpha_only, "RGBA")), obj)
    img = tmp_path / "x.jpg"
    Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)).save(img)
    Image.fromarray(np.zeros((6, 8), dtype=np.uint8)).save(tmp_path / "x.mask.png")
    assert _support_mask(img, (6, 8, 3)) is None  # an empty mask is not a label: pseudo-mask instead
    assert "marks no pixel" in caplog.text
    Image.fromarray(obj * 255).save(tmp_path / "x.mask.png")
    assert np.array_equal(_support_mask(img, (6, 8, 3)), obj)


def test_cache_entry_holds_one_image_not_its_batch(tmp_path):
    batch = torch.randn(8, 3, 50, 64)  # features of an encode batch of 8 images
    cache = FeatureCache(tmp_path / "cache", {"name": "b", "weights_sha256": "w", "image_size": 64})
    src = tmp_path / "img.png"
    src.write_bytes(b"pixels")
    cache.put(src, {"tokens": batch[3], "q": batch[2], "k": batch[1]})
    stored = cache.get(src)["tokens"]
    assert torch.equal(stored, batch[3])
    assert stored.untyped_storage().nbytes() == batch[3].numel() * 4  # not the 8-image storage
    assert cache._path(src).stat().st_size < 2 * 3 * batch[3].numel() * 4  # three images' features


def test_a_bad_device_is_a_one_line_error_before_the_run_is_loaded(tmp_path):
    import pytest

    from fscs.errors import FSCSError
    from fscs.predict_model import Predictor

    for device, needle in (("foo", "use auto, cpu, cuda or cuda:N"), ("gpu0", "use auto, cpu, cuda or cuda:N"),
                           (f"cuda:{torch.cuda.device_count() + 3}", "--device cuda:")):
        with pytest.raises(FSCSError, match=needle) as err:  # the run directory does not even exist
            Predictor(tmp_path / "no-run", tmp_path / "no-support", device=device)
        assert "\n" not in str(err.value)


def test_a_query_folder_laid_out_like_support_yields_its_images_not_their_masks(tmp_path):
    from fscs.predict_inputs import expand_queries

    img = np.zeros((6, 8, 3), dtype=np.uint8)
    (tmp_path / "dent").mkdir()
    for name in ("a.jpg", "b.PNG", "b.mask.png", "c.MASK.PNG", ".hidden.png"):
        Image.fromarray(img).save(tmp_path / "dent" / name, format="PNG")
    assert [p.name for p in expand_queries([str(tmp_path)])] == ["a.jpg", "b.PNG"]
    named = expand_queries([str(tmp_path / "dent" / "b.mask.png")])
    assert [p.name for p in named] == ["b.mask.png"]  # a mask named explicitly is a query


def test_support_masks_with_an_upper_case_extension_are_found(tmp_path):
    obj = np.zeros((6, 8), dtype=np.uint8)
    obj[2:4, 3:6] = 1
    for name in ("a.JPG", "b.jpg"):
        Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)).save(tmp_path / name, format="JPEG")
    Image.fromarray(obj * 255).save(tmp_path / "a.MASK.PNG", format="PNG")
    (tmp_path / "masks").mkdir()
    Image.fromarray(obj * 255).save(tmp_path / "masks" / "b.PNG", format="PNG")
    assert np.array_equal(_support_mask(tmp_path / "a.JPG", (6, 8, 3)), obj)
    assert np.array_equal(_support_mask(tmp_path / "b.jpg", (6, 8, 3)), obj)


def test_a_cache_entry_without_every_feature_is_recomputed(tmp_path, caplog):
    """An entry that loads but is not {tokens, q, k} of tensors (another tool's file, an older layout) is a
    cache miss with a warning, not a KeyError traceback when the class is stacked."""
    cache = FeatureCache(tmp_path / "cache", {"name": "b", "weights_sha256": "w", "image_size": 64})
    src = tmp_path / "img.png"
    src.write_bytes(b"pixels")
    cache.put(src, {"tokens": torch.zeros(2, 3)})
    assert cache.get(src) is None
    assert "cache entry lacks tokens/q/k; recomputing" in caplog.text
    torch.save([torch.zeros(2)], cache._path(src))
    assert cache.get(src) is None
    full = {k: torch.full((2, 3), float(i)) for i, k in enumerate(FeatureCache.KEYS)}
    cache.put(src, full)
    assert all(torch.equal(cache.get(src)[k], full[k]) for k in FeatureCache.KEYS)


def test_a_failed_start_leaves_no_empty_out_folder(tmp_path):
    """--out is created early (an unwritable one fails fast) but removed again, with the parents this run
    created, when the run or the support folder is refused; an existing --out stays."""
    import pytest

    from fscs.errors import FSCSError
    from fscs.predict import run_predict

    (tmp_path / "support" / "empty").mkdir(parents=True)
    (tmp_path / "q").mkdir()
    new = tmp_path / "new" / "pred"
    Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)).save(tmp_path / "q" / "a.png")
    with pytest.raises(FSCSError):
        run_predict(tmp_path / "no-run", tmp_path / "support", [str(tmp_path / "q")], new, progress=False)
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(FSCSError):
        run_predict(tmp_path / "no-run", tmp_path / "support", [str(tmp_path / "q")], tmp_path / "kept",
                    progress=False)
    assert (tmp_path / "kept").is_dir()


def test_a_query_given_twice_by_different_paths_is_predicted_once(tmp_path, monkeypatch):
    from fscs.predict_inputs import expand_queries

    (tmp_path / "q").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)).save(tmp_path / "q" / name)
    monkeypatch.chdir(tmp_path)
    got = expand_queries(["q/a.png", str(tmp_path / "q" / "a.png"), "q", str(tmp_path / "q" / "*.png"),
                          "./q/../q/b.png"])
    assert [str(p) for p in got] == ["q/a.png", "q/b.png"]


def test_a_support_image_over_pillows_limit_is_read_downscaled_with_its_mask(tmp_path, monkeypatch):
    """Pillow refuses images over ~179 MP (here: over 600 pixels): the support image is read with its
    longer side at max_side and its full-size mask brought to that size, instead of being skipped."""
    import fscs.data.transforms as tr
    from fscs.predict_inputs import scan_support

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    monkeypatch.setattr(tr, "PIL_LIMIT_PIXELS", 600)
    (tmp_path / "dent").mkdir()
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(tmp_path / "dent" / "a.png")
    obj = np.zeros((40, 60), dtype=np.uint8)
    obj[:, :30] = 255
    Image.fromarray(obj).save(tmp_path / "dent" / "a.mask.png")
    (sc,) = scan_support(tmp_path, max_side=15)
    assert sc.images[0].shape == (10, 15, 3) and sc.masks[0].shape == (10, 15)
    assert sc.masks[0][:, :7].all() and not sc.masks[0][:, 8:].any()


def test_a_cache_inside_the_support_folder_is_refused_up_front(tmp_path):
    """--cache support/cache worked once, then every later run stopped at a support class 'cache' without
    images; it is refused before anything is loaded or created."""
    import pytest

    from fscs.errors import FSCSError
    from fscs.predict_model import Predictor

    (tmp_path / "support" / "dent").mkdir(parents=True)
    with pytest.raises(FSCSError, match=r"--cache .* is inside --support .*put the cache elsewhere"):
        Predictor(tmp_path / "no-run", tmp_path / "support", cache_dir=tmp_path / "support" / "cache")
    assert not (tmp_path / "support" / "cache").exists()
