"""Data registry: shapes, ranges and labels of every dataset, the bad-file policy, the
missing-dataset message, image validation and the seeded loader."""

from __future__ import annotations

import gzip
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cartlib import data
from cartlib.config import ConfigError, DataConfig

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_debian = pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed (sudo apt-get install "
    "dataset-fashion-mnist); the synthetic-idx tests still cover the reader",
)


def assert_images(ds, resolution, n_classes):
    """Every item: float32 (3, R, R) in [0, 1] and an int label below n_classes."""
    assert ds.num_classes == len(ds.classes) == n_classes
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, resolution, resolution)
        assert x.min() >= 0 and x.max() <= 1
        assert isinstance(y, int) and 0 <= y < n_classes


@pytest.fixture
def no_fashion(tmp_path, monkeypatch):
    """A machine without Fashion-MNIST: empty CART_DATA_DIR and cache, no Debian package."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("CART_DATA_DIR", str(empty))
    monkeypatch.setenv("CART_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data.arrays, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    return empty


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


# -------------------------------------------------------------------------------- fashion-mnist
@needs_debian
def test_fashion_mnist_from_debian_matches_raw_bytes():
    ds = data.load_dataset("fashion-mnist", "train", resolution=28, limit=50)
    assert ds.source == str(DEBIAN) and len(ds) == 50
    assert_images(ds, 28, 10)
    raw = data.read_idx(DEBIAN / "train-images-idx3-ubyte.gz", limit=50)
    labels = data.read_idx(DEBIAN / "train-labels-idx1-ubyte.gz", limit=50)
    x, y = ds[7]
    assert torch.equal(x, torch.from_numpy(raw[7]).float().div(255).expand(3, -1, -1))
    assert y == int(labels[7])
    assert len(data.load_dataset("fashion-mnist", "test")) == 10_000


@needs_debian
@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_fashion_mnist_resolution_limit_and_order(resolution):
    a = data.load_dataset("fashion-mnist", resolution=resolution, limit=20)
    b = data.load_dataset("fashion-mnist", resolution=resolution, limit=5)
    assert_images(a, resolution, 10)
    for i in range(5):  # a limit is a prefix of one fixed order
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]


@needs_debian
def test_lazy_resize_equals_cached(monkeypatch):
    cached = data.load_dataset("fashion-mnist", resolution=40, limit=6)
    monkeypatch.setattr(data.arrays, "CACHE_BYTES", 0)
    lazy = data.load_dataset("fashion-mnist", resolution=40, limit=6)
    assert lazy.lazy and not cached.lazy
    assert all(torch.equal(lazy[i][0], cached[i][0]) for i in range(6))


def test_fashion_mnist_from_cart_data_dir(no_fashion):
    folder = no_fashion / "fashion-mnist"  # $CART_DATA_DIR/fashion-mnist/ is searched too
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 28, 28))
    for split, n in (("train", 6), ("t10k", 3)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images[:n])
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    ds = data.load_dataset("fashion-mnist", resolution=28, download=False)
    assert ds.source == str(folder) and len(ds) == 6
    assert torch.equal(ds[4][0][1], torch.from_numpy(images[4]).float() / 255) and ds[4][1] == 4
    assert len(data.load_dataset("fashion-mnist", "test", download=False)) == 3
    # a truncated file is named, with the fix, instead of failing deep inside numpy
    gz = folder / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:2000])
    with pytest.raises(data.BadFileError, match="train-images-idx3-ubyte.gz.*reinstall"):
        data.load_dataset("fashion-mnist", download=False)


def test_missing_fashion_mnist_names_the_three_ways(no_fashion, capsys):
    with pytest.raises(data.DatasetUnavailableError) as err:
        data.load_dataset("fashion-mnist", root=str(no_fashion), download=False)
    msg = str(err.value)
    assert "sudo apt-get install dataset-fashion-mnist" in msg
    assert "set CART_DATA_DIR to a folder with the four idx files" in msg
    assert "run once online so torchvision downloads it" in msg
    assert str(no_fashion) in msg and str(data.arrays.DEBIAN_FASHION_MNIST) in msg
    assert data.check_dataset("fashion-mnist", download=False) == 1
    assert "sudo apt-get install dataset-fashion-mnist" in capsys.readouterr().out


@needs_debian
def test_check_dataset_reports_location_and_size(capsys):
    assert data.check_dataset("fashion-mnist") == 0
    out = capsys.readouterr().out
    assert str(DEBIAN) in out and "60000 train + 10000 test" in out


# ------------------------------------------------------------------------------- skimage-photos
def test_skimage_photos_shapes_labels_and_splits():
    train = data.load_dataset("skimage-photos", "train", resolution=24)
    test = data.load_dataset("skimage-photos", "test", resolution=24)
    n = len(data.SKIMAGE_PHOTOS)
    assert len(train) == 64 * n and len(test) == 16 * n
    assert train.classes == list(data.SKIMAGE_PHOTOS)
    assert_images(test, 24, n)
    assert [train[i][1] for i in range(n)] == list(range(n))  # a limit spans every photo
    first = data.load_dataset("skimage-photos", resolution=24, limit=n)
    assert all(torch.equal(first[i][0], train[i][0]) for i in range(n))  # deterministic prefix
    assert not torch.equal(train[0][0], test[0][0])  # test crops come from other seeds
    assert train[0][0].std() > 0.02  # real photo content, not a constant


# ---------------------------------------------------------------------------------- imagefolder
def save(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    """train/ and val/ with classes cat, dog and images in several PIL modes and formats."""
    root = tmp_path / "images"
    red, grey = Image.new("RGB", (20, 12), (255, 0, 0)), Image.new("L", (9, 9), 77)
    for split in ("train", "val"):
        save(root / split / "cat" / "red.png", red)
        save(root / split / "cat" / "red.jpg", red)
        save(root / split / "dog" / "grey.png", grey)
        save(root / split / "dog" / "cmyk.jpg", Image.new("CMYK", (16, 16), (0, 255, 0, 0)))
    save(root / "train" / "dog" / "clear.png", Image.new("RGBA", (8, 8), (0, 0, 0, 0)))
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = (0, 0, 255)  # blue centre square between black sides
    save(root / "train" / "dog" / "wide.png", Image.fromarray(wide))
    deep = Image.fromarray(np.full((8, 8), 40000, np.uint16))  # 16-bit grey
    save(root / "train" / "dog" / "deep.png", deep)
    (root / "train" / "dog" / "notes.txt").write_text("not an image, not listed")
    return root


def by_name(ds) -> dict[str, tuple[torch.Tensor, int]]:
    return {Path(f).name: ds[i] for i, f in enumerate(ds.files)}


def test_imagefolder_modes_labels_and_crop(folder):
    train = data.load_dataset("imagefolder", "train", resolution=8, root=str(folder))
    test = data.load_dataset("imagefolder", "test", resolution=8, root=str(folder))
    assert train.classes == test.classes == ["cat", "dog"] and (len(train), len(test)) == (7, 4)
    assert_images(train, 8, 2)
    items = by_name(train)
    assert items["red.png"][1] == 0 and items["grey.png"][1] == 1
    assert torch.allclose(items["red.png"][0][:, 4, 4], torch.tensor([1.0, 0, 0]))
    assert torch.allclose(items["grey.png"][0], torch.full((3, 8, 8), 77 / 255))
    assert torch.allclose(items["clear.png"][0], torch.ones(3, 8, 8))  # alpha on white
    assert torch.allclose(items["wide.png"][0][2], torch.ones(8, 8))  # centre square only
    assert torch.allclose(items["deep.png"][0], torch.full((3, 8, 8), (40000 >> 8) / 255))
    cmyk = items["cmyk.jpg"][0].mean((1, 2))
    assert cmyk[0] > 0.8 and cmyk[1] < 0.2  # magenta ink -> red and blue, no green
    again = data.load_dataset("imagefolder", "train", resolution=8, root=str(folder), limit=3)
    assert again.files == train.files[:3]


def test_imagefolder_without_split_folders_holds_out_by_hash(tmp_path):
    for i in range(40):
        save(tmp_path / f"c{i % 3}" / f"{i}.png", Image.new("RGB", (4, 4), (i, 0, 0)))
    train = data.load_dataset("imagefolder", "train", resolution=4, root=str(tmp_path))
    test = data.load_dataset("imagefolder", "test", resolution=4, root=str(tmp_path))
    assert set(train.files).isdisjoint(test.files) and len(train) + len(test) == 40
    assert 0 < len(test) < 15 and train.classes == ["c0", "c1", "c2"]


def test_imagefolder_missing_split_and_root(folder, tmp_path, monkeypatch):
    (folder / "val").rename(folder / "elsewhere")
    with pytest.raises(ValueError, match="no folder for split='test'"):
        data.load_dataset("imagefolder", "test", root=str(folder))
    monkeypatch.delenv("CART_DATA_DIR", raising=False)
    with pytest.raises(data.DatasetUnavailableError, match="needs root="):
        data.load_dataset("imagefolder")


@pytest.fixture
def corrupt(folder):
    """The train split plus a text file named .png and a JPEG cut in half."""
    cat = folder / "train" / "cat"
    (cat / "fake.png").write_text("this is text, not a PNG")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpeg = save(cat / "full.jpg", Image.fromarray(noise)).read_bytes()
    (cat / "half.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (cat / "full.jpg").unlink()
    return folder


def test_corrupt_file_error_names_the_file_and_the_fix(corrupt):
    with pytest.raises(data.BadFileError, match=r"1 unreadable.*fake\.png.*bad_files='skip'"):
        data.load_dataset("imagefolder", root=str(corrupt))
    (corrupt / "train" / "cat" / "fake.png").unlink()
    ds = data.load_dataset("imagefolder", root=str(corrupt), resolution=8)  # header is fine
    half = ds.files.index(corrupt / "train" / "cat" / "half.jpg")
    with pytest.raises(data.BadFileError, match=r"half\.jpg.*bad_files='skip'"):
        ds[half]
    batches = iter(data.make_loader(ds, batch_size=len(ds), shuffle=False, num_workers=1))
    try:
        next(batches)
    except data.BadFileError as e:  # raised in a worker, re-raised here with the file's name
        assert "half.jpg" in str(e)
        e.__traceback__ = None  # frees the iterator now (shutdown at gc time would wait 5 s)
    else:
        pytest.fail("a truncated JPEG decoded in a worker did not raise")
    del batches


def test_corrupt_files_skipped_and_counted(corrupt):
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\).*fake\.png"):
        ds = data.load_dataset("imagefolder", root=str(corrupt), resolution=8, bad_files="skip")
    assert len(ds) == 8 and all(p.name != "fake.png" for p in ds.files)
    with pytest.warns(UserWarning, match=r"half\.jpg.*2 skipped so far"):
        items = [ds[i] for i in range(len(ds))]
    assert [p.name for p, _ in ds.skipped] == ["fake.png", "half.jpg"]
    half = [p.name for p in ds.files].index("half.jpg")
    assert torch.equal(items[half][0], items[(half + 1) % len(ds)][0])  # the next stands in
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file, not on every access
        ds[half]


# -------------------------------------------------------------------------------------- cifar10
@pytest.mark.skipif(data.arrays._find_cifar(None) is None, reason="CIFAR-10 is not on this machine")
def test_cifar10_local():
    ds = data.load_dataset("cifar10", "test", resolution=16, limit=10, download=False)
    assert_images(ds, 16, 10)


def test_cifar10_from_cart_data_dir_and_missing_message(tmp_path, monkeypatch):
    monkeypatch.setenv("CART_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CART_DATA_DIR", str(tmp_path))
    with pytest.raises(data.DatasetUnavailableError) as err:
        data.load_dataset("cifar10", download=False)
    msg = str(err.value)
    assert "cifar-10-batches-py" in msg and "CART_DATA_DIR" in msg and "online" in msg
    assert str(tmp_path) in msg and "download=False" in msg
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"  # the layout torchvision unpacks
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 3 * 32 * 32), dtype=np.uint8)
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch = {"data": pixels[i : i + 1], "labels": [i]}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": [f"class{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    train = data.load_dataset("cifar10", resolution=32, download=False)
    assert len(train) == 5 and train.classes[3] == "class3" and train.source == str(folder)
    assert_images(train, 32, 10)
    x, y = train[2]
    assert y == 2 and torch.equal(x, torch.from_numpy(pixels[2].reshape(3, 32, 32)) / 255)
    assert len(data.load_dataset("cifar10", resolution=32, limit=2, download=False)) == 2
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(data.BadFileError, match="test_batch is unreadable"):
        data.load_dataset("cifar10", "test", download=False)


# --------------------------------------------------------------------------- registry and input
def test_unknown_name_and_bad_arguments():
    with pytest.raises(ConfigError, match="did you mean 'fashion-mnist'.*skimage-photos"):
        data.load_dataset("fashion_mnist")
    for kwargs, match in [
        ({"split": "val"}, "split='val'"),
        ({"resolution": 0}, "resolution=0"),
        ({"limit": 0}, "limit=0"),
        ({"bad_files": "ignore"}, "bad_files='ignore'"),
    ]:
        with pytest.raises(ValueError, match=match):
            data.load_dataset("skimage-photos", **kwargs)


@pytest.mark.parametrize(
    "x, match",
    [
        (np.zeros((1, 3, 4, 4)), "must be a torch.Tensor"),
        (torch.zeros(3, 4, 4), r"4-D.*unsqueeze\(0\)"),
        (torch.zeros(1, 3, 4, 4, dtype=torch.uint8), r"x.float\(\) / 255"),
        (torch.full((1, 3, 4, 4), 200.0), "divide by 255"),
        (torch.full((1, 3, 4, 4), -0.5), r"\(x \+ 1\) / 2"),
        (torch.full((1, 3, 4, 4), 1e4), "rescale or clamp"),
        (torch.tensor([[[[0.5, float("nan")]]]]), "NaN"),
        (torch.tensor([[[[0.5, float("inf")]]]]), "inf"),
        (torch.zeros(0, 3, 4, 4), "empty"),
    ],
)
def test_check_images_errors(x, match):
    with pytest.raises(ValueError, match=f"batch.*{match}|{match}") as err:
        data.check_images(x, name="batch")
    assert "batch" in str(err.value)


def test_check_images_accepts_valid_and_checks_channels():
    x = torch.rand(2, 3, 5, 5)
    assert data.check_images(x) is x
    assert data.check_images(x + 1e-6) is not None  # float rounding above 1 is tolerated
    with pytest.raises(ValueError, match="3 channels"):
        data.check_images(torch.rand(2, 1, 5, 5), channels=3)


def test_loader_is_seeded_and_config_limits_apply():
    cfg = DataConfig(dataset="skimage-photos", resolution=8, train_limit=20, test_limit=6)
    ds = data.load_dataset_from_config(cfg, "train")
    assert len(ds) == 20 and len(data.load_dataset_from_config(cfg, "test")) == 6
    labels = lambda seed: [y.tolist() for _, y in data.make_loader(ds, 8, seed=seed)]
    assert labels(0) == labels(0) != labels(1)
    assert len(labels(0)) == 2  # shuffled loaders drop the ragged last batch
    assert len(list(data.make_loader(ds, 8, shuffle=False))) == 3
    with pytest.raises(ValueError, match="batch_size=64 exceeds the 20 items"):
        data.make_loader(ds, 64)


def test_extraction_views_are_vars_crops_at_full_scale_and_flips_when_small():
    """Full-scale presets (random_crop, no hflip): every extracted view is a random crop, never
    mirrored, the same for the same (seed, image, view); small presets keep the centre crop
    and its mirror (LlamaGen) as views 0 and 1."""
    from cartlib.config import load_preset
    from cartlib.data.augment import view

    d = load_preset("cart-d16-256").data
    assert d.random_crop and not d.hflip and d.views == 16
    crops = [view(7, v, 0, d.random_crop, d.hflip) for v in range(d.views)]
    assert not any(c.flip for c in crops)
    assert len({(c.top, c.left) for c in crops}) == d.views  # no two views alike
    assert view(7, 3, 0, True, False) == crops[3]
    mirrored = [view(7, v, 0, True, True).flip for v in range(64)]
    assert 16 < sum(mirrored) < 48  # with hflip: about half
    small = [view(7, v, 0) for v in (0, 1)]
    assert small[0].top is None and not small[0].flip and small[1].flip
