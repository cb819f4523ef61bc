"""Image pipelines: a folder of files with the bad-input list's quirks, .npz arrays, TFDS datasets by name (on TFDS's
mock data, and on a tiny dataset prepared here as array_record, so real decoding), augmentation and mixup
determinism, the soft-label loss, the auto rule, and trainer runs on a synthetic image folder."""
import io
import json
import os
import signal

import jax
import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from conftest import ROOT, run_cli, shared_data, tiny_config  # noqa: E402
from transfer import config_base, hyper_rule, models, rules, tasks, train  # noqa: E402
from transfer import metrics as metrics_lib  # noqa: E402
from transfer.data import build, image_folder, image_ops, images, mixup, tfds_image  # noqa: E402
from transfer.data import train_rows, typical_image_side  # noqa: E402
from transfer.data.images import ImageDataset  # noqa: E402

MOCK = dict(policy=tfds.testing.MockPolicy.USE_CODE)
HYMENOPTERA = shared_data("hymenoptera")
FROZEN = [("head/.*", {}), ("backbone/.*", dict(freeze=True))]


def data_config(data_dir=None, **fields):
  cfg = config_base.base().data
  cfg.name, cfg.data_dir = "image_folder", None if data_dir is None else str(data_dir)
  for key, value in fields.items():
    cfg[key] = value
  return cfg


def photo(rng, height, width, label):
  """Noise around a class colour: learnable, and every image distinct."""
  colour = np.array([[200, 60, 60], [60, 60, 200], [60, 200, 60]][label])
  return np.clip(colour + rng.integers(-40, 40, (height, width, 3)), 0, 255).astype(np.uint8)


def write_folder(root, splits=(("train", 6), ("val", 3)), classes=("cat", "dog")):
  """ROOT/SPLIT/CLASS/i.jpg|png of varying sizes and aspects; a split named '' gives ROOT/CLASS/."""
  rng = np.random.default_rng(0)
  for split, n in splits:
    for label, name in enumerate(classes):
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(n):
        Image.fromarray(photo(rng, 20 + 3 * i, 36 - 2 * i, label)).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
  return root


def add_quirks(folder):
  """The bad-input list, in one class folder: 3 usable files (grey, RGBA, a photo with another extension) and 4
  unusable ones (a truncated JPEG, a text file named .png, a text file, a placeholder GIF); a hidden file."""
  Image.fromarray(np.full((24, 30), 90, np.uint8)).save(folder / "grey.jpg")
  rgba = np.zeros((24, 30, 4), np.uint8)
  rgba[..., 0], rgba[:, 15:, 3] = 200, 255        # left half fully transparent
  Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
  rng = np.random.default_rng(1)
  Image.fromarray(photo(rng, 26, 30, 0)).save(folder / "photo.JPEG")
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
  (folder / "truncated.jpg").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
  (folder / "fake.png").write_bytes(b"this is not a png")
  (folder / "notes.txt").write_text("checked by hand")
  Image.new("P", (30, 30)).save(folder / "imageNotFound.gif")
  (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")


def image_bytes(ds):
  return sorted(im.tobytes() for im in ds.images)


# ------------------------------------------------------------------------------------------------------------------
# Folders of image files.
# ------------------------------------------------------------------------------------------------------------------
def test_folder_quirks_are_converted_or_skipped_and_reported(tmp_path, capsys):
  root = write_folder(tmp_path / "pets")
  add_quirks(root / "train" / "cat")
  train_ds, eval_ds = build(data_config(root, resolution=16), None)
  out = capsys.readouterr().out
  assert (len(train_ds), len(eval_ds)) == (6 + 3 + 6, 6)
  assert train_ds.class_names == ["cat", "dog"] and np.bincount(train_ds.labels).tolist() == [9, 6]
  assert (train_ds.name, eval_ds.name) == (str(root / "train"), str(root / "val"))
  assert "skipped 4 of 19 files that are not usable images" in out   # 13 cat files + 6 dog; .DS_Store not counted
  for name in ("truncated.jpg", "fake.png", "notes.txt", "imageNotFound.gif"):
    assert name in out
  assert ".DS_Store" not in out and "photo.JPEG" not in out
  assert "converted 2 images to RGB (from L: 1, RGBA: 1)" in out
  batch = train_ds.train_batch(0, 15, seed=0)
  assert batch["image"].shape == (15, 16, 16, 3) and batch["image"].dtype == np.uint8
  # Stored on the host with the shorter side at most ceil(16 / 0.875) = 19, never enlarged.
  assert all(im.ndim == 3 and im.shape[2] == 3 and min(im.shape[:2]) == 19 for im in train_ds.images)

  with pytest.raises(ValueError, match=r"4 of 19 files are not usable images \(config.data.strict=True\)") as err:
    build(data_config(root, resolution=16, strict=True), None)
  assert "imageNotFound.gif" in str(err.value) and "truncated.jpg" in str(err.value)


def test_grey_and_rgba_become_rgb_and_big_images_shrink_once(tmp_path):
  add_quirks(tmp_path)
  grey, mode = images.decode_image(str(tmp_path / "grey.jpg"), 64)
  assert mode == "L" and grey.shape == (24, 30, 3)
  assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
  rgba, mode = images.decode_image(str(tmp_path / "rgba.png"), 64)
  assert mode == "RGBA" and rgba.shape == (24, 30, 3)
  assert (rgba[:, :15] == 255).all()                         # transparent: laid over white
  assert (rgba[:, 15:] == [200, 0, 0]).all()                 # opaque: its own colour
  small, _ = images.decode_image(str(tmp_path / "photo.JPEG"), 13)
  assert small.shape == (13, 15, 3)                          # 26x30 -> shorter side 13, aspect kept
  with pytest.raises(OSError, match="truncated"):
    images.decode_image(str(tmp_path / "truncated.jpg"), 64)
  for pixels in (np.zeros((5, 7), np.uint8), np.zeros((5, 7, 1), np.uint8), np.zeros((5, 7, 4), np.uint8)):
    assert images.decode_image(pixels, 64)[0].shape == (5, 7, 3)


def test_sixteen_bit_grey_is_rescaled_and_exif_orientation_applied(tmp_path):
  levels = np.linspace(0, 65535, 24 * 30).reshape(24, 30).astype(np.uint16)
  Image.fromarray(levels).save(tmp_path / "deep.png")                       # 16-bit grey PNG
  pixels, mode = images.decode_image(str(tmp_path / "deep.png"), 64)
  assert mode.startswith("I") and pixels.shape == (24, 30, 3)
  np.testing.assert_allclose(pixels[..., 0], levels / 257.0, atol=0.51)    # not clipped at 255
  assert (pixels[..., 0] == pixels[..., 2]).all() and 0 < np.median(pixels) < 255
  # A landscape JPEG whose EXIF says "rotate 90 degrees clockwise to view" (orientation 6) comes out portrait.
  wide = np.zeros((20, 40, 3), np.uint8)
  wide[:, :20] = 255                                                         # left half white
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(wide).save(tmp_path / "phone.jpg", exif=exif, quality=95)
  upright, _ = images.decode_image(str(tmp_path / "phone.jpg"), 64)
  assert upright.shape == (40, 20, 3)
  assert upright[:15].mean() > 200 and upright[25:].mean() < 50           # the white half is now on top


@pytest.mark.skipif(HYMENOPTERA is None,
                    reason="../shared/data/hymenoptera is absent (the synthetic-folder tests run the same code)")
def test_real_hymenoptera_folder(capsys):
  train_src, eval_src = image_folder.sources(data_config(HYMENOPTERA))
  train = images.decode_source(train_src, 37, strict=False)
  out = capsys.readouterr().out
  assert len(train.images) == 244 and np.bincount(train.labels).tolist() == [123, 121]
  assert "skipped 1 of 245 files" in out and "train/ants/imageNotFound.gif" in out
  assert any(w.endswith("train/ants/formica.jpeg") for w in train.where)   # a real photo with another extension
  assert all(im.shape[2] == 3 and min(im.shape[:2]) == 37 for im in train.images)
  evaluation = images.decode_source(eval_src, 37, strict=False)
  assert eval_src.class_names == ["ants", "bees"] and np.bincount(evaluation.labels).tolist() == [70, 83]
  with pytest.raises(ValueError, match=r"1 of 245 files .*imageNotFound.gif"):
    images.decode_source(train_src, 37, strict=True)


def test_large_jpeg_decodes_at_reduced_size_and_large_other_files_are_reported(tmp_path, capsys):
  """A JPEG decodes at 1/8 scale when that still covers the side kept (never whole); a PNG, which cannot, is
  reported when its decode is over 8x the side kept (``images.OVERSIZE``), naming the largest."""
  y, x = np.mgrid[0:2000, 0:2000]
  smooth = np.stack([x % 256, y % 256, (x + y) // 20 % 256], -1).astype(np.uint8)   # compresses fast and small
  folder = tmp_path / "big" / "a"
  folder.mkdir(parents=True)
  Image.fromarray(smooth).save(folder / "huge.jpg", quality=80)
  Image.fromarray(smooth[:600, :1200]).save(folder / "wide.png")
  Image.fromarray(smooth[:200, :200]).save(folder / "small.png")
  jpeg = images.read_image(str(folder / "huge.jpg"), 32)
  assert jpeg.decoded_size == (250, 250) and jpeg.pixels.shape == (32, 32, 3)   # 2000 / 8, then shrunk once
  png = images.read_image(str(folder / "wide.png"), 32)
  assert png.decoded_size == (1200, 600) and png.pixels.shape == (32, 64, 3)
  decoded = images.decode_source(image_folder.listing(str(tmp_path / "big")), 32, strict=False)
  assert len(decoded.images) == 3
  out = capsys.readouterr().out
  assert (f"warning: {tmp_path / 'big'}: 1 of 3 files were decoded with a shorter side at least 8x the 32 px kept, "
          f"the largest {folder / 'wide.png'} at 1200x600 (2 MB as RGB)") in out
  images.decode_source(image_folder.listing(str(tmp_path / "big")), 128, strict=False)   # 600 < 8 * 128
  assert "were decoded with a shorter side" not in capsys.readouterr().out


def test_a_class_without_evaluation_images_is_named(tmp_path, capsys):
  # Held out: 4 of 21 images, evenly spaced over the class-sorted order, none of them the single 'rare' one.
  root = write_folder(tmp_path / "flat", splits=(("", 10),), classes=("a", "b"))
  write_folder(tmp_path / "one", splits=(("", 1),), classes=("rare",))
  (tmp_path / "one" / "rare").rename(root / "rare")
  train_ds, eval_ds = build(data_config(root, resolution=16, test_fraction=0.2), None)
  assert np.bincount(eval_ds.labels, minlength=3).tolist() == [2, 2, 0] and 2 in train_ds.labels
  assert (f"warning: {root}[held-out 20%]: no evaluation images of class(es) ['rare'] (config.data.test_fraction=0.2 "
          "held out none of their images: raise it, or add images): accuracy covers the other classes only"
          ) in capsys.readouterr().out
  # A separate evaluation folder without one of the training classes: said too.
  split = write_folder(tmp_path / "split", splits=(("train", 2), ("val", 2)), classes=("cat", "dog", "fox"))
  for file in (split / "val" / "fox").iterdir():
    file.unlink()
  build(data_config(split, resolution=16), None)
  assert ("no evaluation images of class(es) ['fox'] (the evaluation split has none of their images)"
          in capsys.readouterr().out)
  build(data_config(write_folder(tmp_path / "full"), resolution=16), None)
  assert "no evaluation images" not in capsys.readouterr().out


def test_folder_layout_errors(tmp_path):
  one = write_folder(tmp_path / "one", classes=("cat",))
  with pytest.raises(ValueError, match=r"one/train: only 1 class \['cat'\]; classification needs at least 2"):
    build(data_config(one, resolution=16), None)
  empty = write_folder(tmp_path / "empty")
  (empty / "train" / "bird").mkdir()
  with pytest.raises(ValueError, match=r"train/bird: a class folder without image files"):
    build(data_config(empty, resolution=16), None)
  extra = write_folder(tmp_path / "extra")
  (extra / "val" / "fish").mkdir()
  with pytest.raises(ValueError, match=r"class folder\(s\) \['fish'\] are not among the training classes"):
    build(data_config(extra, resolution=16), None)
  no_eval = write_folder(tmp_path / "no_eval", splits=(("train", 2),))
  with pytest.raises(FileNotFoundError, match=r"none of \['val', 'validation', 'test'\].*config.data.eval_split"):
    build(data_config(no_eval, resolution=16), None)
  with pytest.raises(FileNotFoundError, match=r"config.data.data_dir='.*nowhere' is not a folder"):
    build(data_config(tmp_path / "nowhere", resolution=16), None)
  with pytest.raises(ValueError, match=r"config.data.data_dir: set it to the image folder"):
    build(data_config(None, resolution=16), None)
  with pytest.raises(ValueError, match=r"config.data.resolution='auto': expected a number of pixels"):
    build(data_config(one, resolution="auto"), None)
  # Split folders that are not train/: taken as classes they would mislabel everything, so they are refused.
  renamed = write_folder(tmp_path / "renamed", splits=(("training", 2), ("val", 2)))
  with pytest.raises(FileNotFoundError, match=r"no train/ folder, but it has val/.*config.data.train_split"):
    build(data_config(renamed, resolution=16), None)
  assert len(build(data_config(renamed, resolution=16, train_split="training"), None)[0]) == 4
  with pytest.raises(FileNotFoundError, match=r"config.data.eval_split='val' is set.*config.data.train_split"):
    build(data_config(tmp_path / "renamed" / "training", resolution=16, eval_split="val"), None)


def test_evaluating_on_the_training_split_is_flagged(tmp_path, capsys):
  from transfer.data import warn_if_eval_is_train
  for train, evaluation in (("train", "train"), ("train", "train[80%:]"), ("train[:50%]", "train")):
    assert warn_if_eval_is_train(train, evaluation, "eval_split", paths=False)
  assert f"warning: config.data.eval_split='train[80%:]' is or contains the training data ('train')" in \
      capsys.readouterr().out
  for train, evaluation in (("train", "test"), ("train[:80%]", "train[80%:]")):
    assert not warn_if_eval_is_train(train, evaluation, "eval_split", paths=False)
  assert warn_if_eval_is_train("a.npz", "a/../a.npz", "eval_file", paths=True)
  assert not warn_if_eval_is_train("a.npz", "b.npz", "eval_file", paths=True)
  capsys.readouterr()
  root = write_folder(tmp_path / "same")
  build(data_config(root, resolution=16, eval_split="train"), None)      # allowed, and said
  assert "config.data.eval_split=" in capsys.readouterr().out


def test_held_out_fraction_is_stratified_fixed_by_split_seed(tmp_path):
  root = write_folder(tmp_path / "flat", splits=(("", 10),), classes=("a", "b", "c"))
  train_ds, eval_ds = build(data_config(root, resolution=16, test_fraction=0.3, split_seed=1), None)
  assert (len(train_ds), len(eval_ds)) == (21, 9) and np.bincount(eval_ds.labels).tolist() == [3, 3, 3]
  assert eval_ds.name == f"{root}[held-out 30%]"
  assert len(set(image_bytes(train_ds) + image_bytes(eval_ds))) == 30   # every image in exactly one split
  again = build(data_config(root, resolution=16, test_fraction=0.3, split_seed=1), None)[1]
  other = build(data_config(root, resolution=16, test_fraction=0.3, split_seed=2), None)[1]
  assert image_bytes(again) == image_bytes(eval_ds) and image_bytes(other) != image_bytes(eval_ds)
  # k per class: stratified, and the 2-per-class subset lies inside the 4-per-class one.
  two = build(data_config(root, resolution=16, test_fraction=0.3, train_per_class=2), None)[0]
  four = build(data_config(root, resolution=16, test_fraction=0.3, train_per_class=4), None)[0]
  assert np.bincount(two.labels).tolist() == [2, 2, 2] and set(image_bytes(two)) < set(image_bytes(four))
  with pytest.raises(ValueError, match=r"config.data.train_per_class=8: must be between 1 and 7"):
    build(data_config(root, resolution=16, test_fraction=0.3, train_per_class=8), None)
  # A class too small for the fraction would vanish from training: refused, naming the field.
  rare = write_folder(tmp_path / "rare", splits=(("", 1),), classes=("x",))
  write_folder(tmp_path / "rare_more", splits=(("", 9),), classes=("y", "z"))
  for name in ("y", "z"):
    (tmp_path / "rare_more" / name).rename(rare / name)
  with pytest.raises(ValueError, match=r"config.data.test_fraction=0.5 holds out every example of class id\(s\) \[0\]"):
    build(data_config(rare, resolution=16, test_fraction=0.5, split_seed=0), None)


# ------------------------------------------------------------------------------------------------------------------
# .npz arrays.
# ------------------------------------------------------------------------------------------------------------------
IMG = np.random.default_rng(0).integers(0, 256, (6, 10, 12, 3), dtype=np.uint8)
LBL = np.array([0, 1] * 3)


def npz_config(train_file, eval_file=None, **fields):
  return data_config(name="npz", train_file=str(train_file), eval_file=eval_file and str(eval_file), **fields)


def test_npz_arrays_with_grey_rgba_and_class_names(tmp_path):
  grey = np.random.default_rng(1).integers(0, 256, (12, 10, 14), dtype=np.uint8)
  np.savez(tmp_path / "train.npz", image=grey, label=np.arange(12) % 3, class_names=np.array(["x", "y", "z"]))
  np.savez(tmp_path / "eval.npz", image=np.full((5, 10, 14, 4), 128, np.uint8), label=np.array([0, 1, 2, 0, 1]))
  train_ds, eval_ds = build(npz_config(tmp_path / "train.npz", tmp_path / "eval.npz", resolution=8), None)
  assert train_ds.class_names == eval_ds.class_names == ["x", "y", "z"] and (len(train_ds), len(eval_ds)) == (12, 5)
  batch = next(train_ds.eval_batches(12))["image"]
  assert batch.shape == (12, 8, 8, 3) and (batch[..., 0] == batch[..., 2]).all()   # grey -> equal channels
  held_train, held_eval = build(npz_config(tmp_path / "train.npz", resolution=8), None)
  assert (len(held_train), len(held_eval)) == (10, 2)
  np.savez(tmp_path / "single.npz", image=IMG, label=np.zeros(6, np.int64))
  with pytest.raises(ValueError, match=r"single.npz: only 1 class \['0'\]"):
    build(npz_config(tmp_path / "single.npz", resolution=8), None)


@pytest.mark.parametrize("arrays,message", [
    (dict(pixels=IMG, label=LBL), r"no array 'image' \(the file has \['label', 'pixels'\]\)"),
    (dict(image=IMG), r"no array 'label' \(the file has \['image'\]\)"),
    (dict(image=IMG.astype(np.float32), label=LBL), r"array 'image' is float32; expected uint8"),
    (dict(image=IMG.transpose(0, 3, 1, 2), label=LBL), r"array 'image' has shape \(6, 3, 10, 12\), channels first"),
    (dict(image=IMG[..., :2], label=LBL), r"array 'image' has shape \(6, 10, 12, 2\); expected"),
    (dict(image=IMG, label=np.eye(2)[LBL]), r"array 'label' has shape \(6, 2\); expected \(N,\) class ids \(one-hot"),
    (dict(image=IMG, label=LBL.astype(np.float32)), r"array 'label' is float32 \(6,\); expected \(N,\) integer"),
    (dict(image=IMG, label=LBL[:4]), r"array 'label' has 4 rows but 'image' has 6"),
    (dict(image=IMG, label=LBL - 1), r"array 'label' holds -1; class ids start at 0"),
    (dict(image=IMG, label=LBL, class_names=np.array(["one"])), r"class id 1 but 'class_names' names only 1"),
])
def test_npz_with_the_wrong_layout_names_the_array(tmp_path, arrays, message):
  np.savez(tmp_path / "bad.npz", **arrays)
  with pytest.raises(ValueError, match=message) as err:
    build(npz_config(tmp_path / "bad.npz", resolution=8), None)
  assert str(tmp_path / "bad.npz") in str(err.value)


def test_npz_file_errors(tmp_path):
  np.save(tmp_path / "array.npy", IMG)
  with pytest.raises(ValueError, match=r"array.npy: a single array \(uint8 \(6, 10, 12, 3\)\), not an .npz"):
    build(npz_config(tmp_path / "array.npy", resolution=8), None)
  (tmp_path / "junk.npz").write_bytes(b"PK\3\4 but not a zip")
  with pytest.raises(ValueError, match=r"junk.npz: not a readable .npz file"):
    build(npz_config(tmp_path / "junk.npz", resolution=8), None)
  with pytest.raises(FileNotFoundError, match=r"config.data.train_file='.*missing.npz' does not exist"):
    build(npz_config(tmp_path / "missing.npz", resolution=8), None)
  np.savez(tmp_path / "train.npz", image=IMG, label=LBL, class_names=np.array(["a", "b"]))
  np.savez(tmp_path / "eval.npz", image=IMG, label=LBL, class_names=np.array(["b", "a"]))
  with pytest.raises(ValueError, match=r"eval.npz: array 'class_names' \['b', 'a'\] differs from the training"):
    build(npz_config(tmp_path / "train.npz", tmp_path / "eval.npz", resolution=8), None)


# ------------------------------------------------------------------------------------------------------------------
# TFDS by name, without TensorFlow.
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,classes", [
    ("cifar10", 10), ("cifar100", 100), ("oxford_iiit_pet", 37), ("oxford_flowers102", 102), ("dtd", 47),
    ("eurosat", 10),
])
def test_named_tfds_datasets_on_mock_data(name, classes, tmp_path):
  cfg = data_config(name="tfds_image", tfds_name=name, data_dir=str(tmp_path), resolution=16)
  with tfds.testing.mock_data(num_examples=20, **MOCK):
    side = typical_image_side(cfg)
    train_ds, eval_ds = build(cfg, None)
  assert side >= 1 and len(train_ds.class_names) == len(eval_ds.class_names) == classes
  if tfds_image.DATASETS[name].eval:
    assert (train_ds.name, eval_ds.name, len(train_ds), len(eval_ds)) == (f"{name}/train", f"{name}/test", 20, 20)
  else:   # one split: a stratified 20% held out
    assert (train_ds.name, eval_ds.name, len(train_ds), len(eval_ds)) == (
        f"{name}/train[train 80%]", f"{name}/train[held-out 20%]", 16, 4)
  batch = train_ds.train_batch(0, 8, seed=0)
  assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].dtype == np.int32 and 0 <= batch["label"].min() and batch["label"].max() < classes
  assert next(eval_ds.eval_batches(8))["image"].shape == (8, 16, 16, 3)


class TransferTestImages(tfds.core.GeneratorBasedBuilder):
  """Red and blue PNGs of varying widths, one of them grey, prepared as array_record without network."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(names=["red", "blue"])}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(8), "test": self._generate_examples(4)}

  def _generate_examples(self, n):
    for i in range(n):
      image = Image.new("RGB", (20 + i, 16), [(220, 20, 20), (20, 20, 220)][i % 2])
      if i == 2:
        image = image.convert("L")
      buffer = io.BytesIO()
      image.save(buffer, "PNG")
      yield i, {"image": buffer.getvalue(), "label": i % 2}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  TransferTestImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


def test_prepared_array_record_images_decode_without_tensorflow(prepared, monkeypatch):
  monkeypatch.setitem(tfds_image.DATASETS, "transfer_test_images", tfds_image.Dataset("train", "test"))
  cfg = data_config(name="tfds_image", tfds_name="transfer_test_images", data_dir=str(prepared), resolution=16)
  assert typical_image_side(cfg) == 16
  train_ds, eval_ds = build(cfg, None)
  assert (len(train_ds), len(eval_ds)) == (8, 4) and train_ds.class_names == ["red", "blue"]
  assert sorted(im.shape[1] for im in train_ds.images) == list(range(20, 28))   # stored bytes decoded as is
  colours = [tuple(im[0, 0]) for im in train_ds.images]
  grey = [c for c in colours if c[0] == c[1] == c[2]]
  assert len(grey) == 1
  for colour, label in zip(colours, train_ds.labels):
    if colour not in grey:
      assert colour == [(220, 20, 20), (20, 20, 220)][label]


def test_unprepared_or_unknown_tfds_dataset_fails_fast(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    build(data_config(name="tfds_image", tfds_name="cifar10", data_dir=str(tmp_path / "empty"), resolution=16), None)
  message = str(err.value)
  assert "cifar10" in message and str(tmp_path / "empty") in message and "download_and_prepare" in message
  assert "array_record" in message
  with pytest.raises(ValueError, match=r"unknown TFDS image dataset 'mnist'; supported: \['cifar10'"):
    build(data_config(name="tfds_image", tfds_name="mnist", resolution=16), None)


# ------------------------------------------------------------------------------------------------------------------
# Augmentation, evaluation view, mixup: functions of (seed, step) alone.
# ------------------------------------------------------------------------------------------------------------------
def synthetic(augment="crop_flip", n=10):
  rng = np.random.default_rng(0)
  pictures = [rng.integers(0, 256, (int(rng.integers(18, 40)), int(rng.integers(18, 40)), 3), dtype=np.uint8)
              for _ in range(n)]
  return ImageDataset(pictures, (np.arange(n) % 2).astype(np.int32), ["a", "b"], "synthetic", resolution=16,
                      augment=augment)


def test_augmented_batches_are_a_pure_function_of_seed_and_step():
  a, b = synthetic(), synthetic()   # b: a fresh dataset, as after a restart
  for step in (0, 3, 7):
    np.testing.assert_array_equal(a.train_batch(step, 8, seed=1)["image"], b.train_batch(step, 8, seed=1)["image"])
  batch = a.train_batch(3, 8, seed=1)
  assert not np.array_equal(batch["image"], a.train_batch(4, 8, seed=1)["image"])
  assert not np.array_equal(batch["image"], a.train_batch(3, 8, seed=2)["image"])
  rows = train_rows(10, 3, 8, 1)   # the rows ArrayDataset would draw
  np.testing.assert_array_equal(batch["label"], a.labels[rows])
  differs = [not np.array_equal(batch["image"][i], a.eval_view(a.images[r])) for i, r in enumerate(rows)]
  assert sum(differs) >= 6          # random crops, not the evaluation view
  # One epoch of 10 in batches of 10: the same image gets another crop in the next epoch.
  first, second = a.train_batch(0, 10, seed=1), a.train_batch(1, 10, seed=1)
  by_row = {r: im for r, im in zip(train_rows(10, 0, 10, 1), first["image"])}
  assert sum(not np.array_equal(by_row[r], im) for r, im in zip(train_rows(10, 1, 10, 1), second["image"])) >= 8


def test_flip_only_and_no_augmentation():
  flip, plain = synthetic("flip"), synthetic("none")
  mirrored = []
  for step in range(4):
    batch = flip.train_batch(step, 8, seed=0)["image"]
    for i, r in enumerate(train_rows(10, step, 8, 0)):
      view = flip.eval_view(flip.images[r])
      mirrored.append(np.array_equal(batch[i], view[:, ::-1]))
      assert mirrored[-1] or np.array_equal(batch[i], view)
      np.testing.assert_array_equal(plain.train_batch(step, 8, seed=0)["image"][i], view)
  assert 0 < sum(mirrored) < len(mirrored)
  with pytest.raises(ValueError, match=r"config.data.augment: 'rotate' is not one of"):
    ImageDataset(flip.images, flip.labels, ["a", "b"], "x", resolution=16, augment="rotate")


def test_eval_view_is_the_exact_central_crop_without_randomness():
  pixels = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
  ds = ImageDataset([pixels, pixels[:, :40]], np.array([0, 1], np.int32), ["a", "b"], "x", resolution=20,
                    eval_crop=0.5)
  np.testing.assert_array_equal(ds.eval_view(pixels), pixels[10:30, 20:40])   # central 20x20, not resampled
  first, second = list(ds.eval_batches(4)), list(ds.eval_batches(4))
  assert len(first) == 1 and first[0]["mask"].tolist() == [1, 1, 0, 0]
  for key in ("image", "label", "mask"):
    np.testing.assert_array_equal(first[0][key], second[0][key])


def test_random_crop_boxes_stay_inside_with_the_asked_area():
  rng = np.random.default_rng(0)
  for _ in range(500):
    width, height = (int(v) for v in rng.integers(20, 90, 2))
    left, top, right, bottom = image_ops.random_box(width, height, rng, 0.25)
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    area = (right - left) * (bottom - top) / (width * height)
    aspect = (right - left) / (bottom - top)
    central = right - left == bottom - top == min(width, height)
    assert central or (0.2 <= area <= 1.0 and 0.7 <= aspect <= 1.43)


def test_mixup_blends_images_and_labels_by_seed_and_step():
  batch = synthetic("none").train_batch(2, 8, seed=0)
  mixed = mixup.mix(batch, 0.4, 2, mixup.generator(0, 2))
  again = mixup.mix(batch, 0.4, 2, mixup.generator(0, 2))
  other = mixup.mix(batch, 0.4, 2, mixup.generator(0, 3))
  for key in ("image", "label"):
    np.testing.assert_array_equal(mixed[key], again[key])
  assert not np.array_equal(mixed["label"], other["label"])
  rng = mixup.generator(0, 2)
  lam, partner = rng.beta(0.4, 0.4), rng.permutation(8)
  onehot = np.eye(2, dtype=np.float32)[batch["label"]]
  assert mixed["label"].shape == (8, 2) and mixed["label"].dtype == np.float32
  np.testing.assert_allclose(mixed["label"], lam * onehot + (1 - lam) * onehot[partner], rtol=1e-6)
  np.testing.assert_allclose(mixed["label"].sum(1), 1.0, rtol=1e-6)
  pixels = batch["image"].astype(np.float64)
  np.testing.assert_array_equal(mixed["image"], np.round(lam * pixels + (1 - lam) * pixels[partner]).astype(np.uint8))
  with pytest.raises(ValueError, match=r"config.mixup mixes images; this dataset's batches hold \['features'"):
    mixup.mix({"features": np.zeros((2, 3)), "label": np.zeros(2, np.int32)}, 0.4, 2, mixup.generator(0, 0))


def test_soft_label_loss_matches_the_hard_label_path():
  """(B, C) targets: one-hot rows give the hard-label loss (with label smoothing too); blended rows give the
  blend of the two hard-label losses (cross-entropy is linear in the targets)."""
  config = config_base.base()
  model = models.FeatureClassifier(num_classes=3, zero_init_head=False)
  features = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
  labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
  variables = model.init(jax.random.PRNGKey(0), {"features": features})
  params = {k: np.asarray(v) for k, v in rules.flatten(variables["params"]).items()}
  _, _, schedule, tx, state = train.init_optimization(config, model, params, {}, jax.random.PRNGKey(1),
                                                      total_steps=4, steps_per_epoch=1)

  def loss(label, smoothing=0.0):
    task = tasks.Classification(tiny_config(label_smoothing=smoothing))
    step, _ = train.make_steps(model, tx, schedule, task, backbone_train=False)
    return float(step(state, {"features": features, "label": label})[1]["train/loss"])

  onehot = np.eye(3, dtype=np.float32)[labels]
  for smoothing in (0.0, 0.1):
    assert loss(onehot, smoothing) == pytest.approx(loss(labels, smoothing), abs=1e-6)
  partner = np.array([3, 4, 5, 0, 1, 2])
  assert loss(0.3 * onehot + 0.7 * onehot[partner]) == pytest.approx(
      0.3 * loss(labels) + 0.7 * loss(labels[partner]), abs=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# The auto rule.
# ------------------------------------------------------------------------------------------------------------------
def test_auto_rule_tiers():
  assert [hyper_rule.resolution(s)[0] for s in (8, 32, 95, 96, 375)] == [128, 128, 128, 224, 224]
  assert [hyper_rule.total_steps(n)[0] for n in (244, 19_999, 20_000, 499_999, 500_000)] == [
      500, 500, 10_000, 10_000, 20_000]
  assert hyper_rule.warmup_steps(500) == (50, "a tenth of 500 steps") and hyper_rule.warmup_steps(3)[0] == 0
  assert hyper_rule.mixup(19_999, images=True, features_cached=False)[0] == 0.0
  assert hyper_rule.mixup(20_000, images=True, features_cached=False)[0] == 0.1
  assert hyper_rule.mixup(50_000, images=True, features_cached=True)[0] == 0.0
  assert hyper_rule.mixup(50_000, images=False, features_cached=False)[0] == 0.0
  config = config_base.base()
  config.total_steps, config.schedule.warmup_steps = "auto", 7
  printed = []
  hyper_rule.apply(config, "total_steps", lambda: hyper_rule.total_steps(1234), printed.append)
  hyper_rule.apply(config, "schedule.warmup_steps", lambda: pytest.fail("not auto: not asked"), printed.append)
  assert config.total_steps == 500 and config.schedule.warmup_steps == 7
  assert printed == ["auto: total_steps = 500 (1,234 training examples < 20,000)"]


@pytest.mark.parametrize("path,value,message", [
    ("data.resolution", "large", r"config.data.resolution='large': expected 'auto' or an integer >= 1$"),
    ("data.resolution", None, r"config.data.resolution=None"),
    ("data.resolution", 0, r"config.data.resolution=0"),
    ("total_steps", 2.5, r"config.total_steps=2.5: expected 'auto' or an integer >= 1 \(or None\)"),
    ("total_steps", True, r"config.total_steps=True"),
    ("schedule.warmup_steps", -1, r"config.schedule.warmup_steps=-1"),
    ("mixup", "0.2", r"config.mixup='0.2': expected 'auto' or a number >= 0.0"),
])
def test_auto_fields_take_only_auto_or_a_number(path, value, message):
  config = config_base.base()
  *parents, leaf = path.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=message):
    hyper_rule.apply(config, path, lambda: pytest.fail("not auto"))


# ------------------------------------------------------------------------------------------------------------------
# The trainer on an image folder.
# ------------------------------------------------------------------------------------------------------------------
def folder_config(root, **overrides):
  return tiny_config(**{"data.name": "image_folder", "data.data_dir": str(root), "data.train_per_class": None,
                        "batch_size": 8, "eval_batch_size": 8, "log_every": 1, "checkpoint.every_steps": 0,
                        **overrides})


def test_trainer_on_an_image_folder_with_mixup(tmp_path, monkeypatch):
  """The backbone runs on the blended images in every step (frozen, to keep the compile short: test_train.py
  covers full fine-tuning, which sees the same batches)."""
  root = write_folder(tmp_path / "pets")
  add_quirks(root / "train" / "cat")
  blends = []
  real_mix = mixup.mix
  monkeypatch.setattr(mixup, "mix", lambda batch, *a: blends.append(real_mix(batch, *a)) or blends[-1])
  results = train.train(folder_config(root, total_steps=3, mixup=0.2, param_rules=FROZEN, feature_cache="off"),
                        str(tmp_path / "run"))
  rows = metrics_lib.read(str(tmp_path / "run"))
  assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["train/loss"]) for r in rows)
  assert len(blends) == 3 and all(b["label"].shape == (8, 2) and b["image"].shape == (8, 32, 32, 3) for b in blends)
  assert not results["feature_cache"]
  # Three steps on a random frozen backbone learn nothing yet (measured: accuracy 0.5, loss 0.69307 = ln 2 - 8e-6),
  # so the figures are held to the saved model's evaluation redone without the trainer, on the 6 unblended
  # validation images (not 8: the last batch's 2 padding rows must not count).
  from conftest import evaluate_saved_run
  redone = evaluate_saved_run(tmp_path / "run")
  assert redone["examples"] == 6 and results["eval/accuracy"] == redone["eval/accuracy"], (results, redone)
  assert results["eval/loss"] == pytest.approx(redone["eval/loss"], abs=1e-6), (results, redone)
  saved = json.load(open(tmp_path / "run" / "config.json"))
  assert saved["data"]["name"] == "image_folder" and saved["mixup"] == 0.2 and saved["data"]["resolution"] == 32


def test_auto_rule_in_the_trainer_prints_and_saves_its_picks(tmp_path, capsys):
  root = write_folder(tmp_path / "pets")
  config = folder_config(root, param_rules=FROZEN, log_every=100, **{
      "data.resolution": "auto", "total_steps": "auto", "schedule.warmup_steps": "auto", "mixup": "auto"})
  results = train.train(config, str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert "auto: data.resolution = 128 (training images' median shorter side 26 px < 96: small images)" in out
  assert "auto: total_steps = 500 (12 training examples < 20,000)" in out
  assert "auto: schedule.warmup_steps = 50 (a tenth of 500 steps)" in out
  assert "auto: mixup = 0.0 (the frozen backbone's features are cached" in out
  saved = json.load(open(tmp_path / "run" / "config.json"))
  assert (saved["data"]["resolution"], saved["total_steps"], saved["schedule"]["warmup_steps"], saved["mixup"]) == (
      128, 500, 50, 0.0)
  assert results["step"] == 500 and results["feature_cache"]
  assert config.total_steps == "auto"   # the caller's config is left as it was
  with pytest.raises(ValueError, match=r"config.mixup=0.2 blends images .* features are cached"):
    train.train(folder_config(root, param_rules=FROZEN, total_steps=3, mixup=0.2), str(tmp_path / "bad"))
  assert not (tmp_path / "bad" / "features").exists()


def test_command_line_takes_numbers_and_auto_in_auto_fields(tmp_path):
  root = write_folder(tmp_path / "pets")
  args = ["--config", f"tests/tiny_image_config.py:{root}", "--workdir", str(tmp_path / "w")]
  out = run_cli(args + ["--config.data.resolution=48", "--config.mixup=auto", "--config.fault.kill_at_step=1"])
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  assert "auto: data.resolution" not in out.stdout
  assert "auto: total_steps = 500" in out.stdout and "auto: mixup = 0.0 (12 training examples" in out.stdout
  saved = json.load(open(tmp_path / "w" / "config.json"))
  assert (saved["data"]["resolution"], saved["total_steps"], saved["mixup"]) == (48, 500, 0.0)
  bad = run_cli(args[:-1] + [str(tmp_path / "bad"), "--config.data.resolution=large"])
  assert bad.returncode == 1 and "config.data.resolution='large': expected 'auto' or an integer >= 1" in bad.stderr
