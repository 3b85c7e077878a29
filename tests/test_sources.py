"""The dataset readers in `framework.data.sources` against torchvision's readers, on tiny files
written in each dataset's exact on-disk format (no download)."""

from __future__ import annotations

import gzip
import io
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets as tvd
from PIL import Image

from framework.data import sources
from framework.data.sources import Sample
from tests.helpers import bomb_png, needs_fashion_mnist

RNG = np.random.default_rng(0)
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --- Python 2 style pickles, as the real CIFAR files are -----------------------------------


class Py2Str(bytes):
    """A Python 2 `str`: pickled as (SHORT_)BINSTRING, read back as `str` with latin1."""


class Py2Pickler(pickle._Pickler):
    """Writes protocol-2 pickles the way Python 2 + numpy wrote the CIFAR batches."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2str(self, obj: Py2Str) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + bytes(obj))
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + bytes(obj))
        self.memoize(obj)

    def save_ndarray(self, obj: np.ndarray) -> None:
        _, (cls, shape, typecode), state = obj.__reduce__()
        self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
        self.save((cls, shape, Py2Str(typecode)))
        self.write(pickle.REDUCE)
        self.memoize(obj)
        self.save((*state[:-1], Py2Str(state[-1])))
        self.write(pickle.BUILD)

    dispatch[Py2Str] = save_py2str
    dispatch[np.ndarray] = save_ndarray


def write_py2_pickle(path: Path, obj: dict) -> None:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump({Py2Str(k.encode()): v for k, v in obj.items()})
    path.write_bytes(buf.getvalue())


def py2_strs(names: list[str]) -> list[Py2Str]:
    return [Py2Str(n.encode()) for n in names]


def test_py2_pickle_keys_read_as_bytes_and_str(tmp_path: Path) -> None:
    write_py2_pickle(tmp_path / "b", {"data": np.zeros((1, 3), np.uint8), "labels": [1]})
    with open(tmp_path / "b", "rb") as f:
        assert set(pickle.load(f, encoding="bytes")) == {b"data", b"labels"}
    with open(tmp_path / "b", "rb") as f:
        assert set(pickle.load(f, encoding="latin1")) == {"data", "labels"}


# --- fixtures writing each format -----------------------------------------------------------

PLANTED = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # HWC, as a PIL RGB image reads
PLANTED_LABEL, PLANTED_AT = 7, 5  # index 5 = 2nd image of data_batch_2 (3 images per batch)


def cifar_batch(n: int, n_classes: int) -> tuple[np.ndarray, list[int]]:
    return RNG.integers(0, 256, (n, 3072), dtype=np.uint8), RNG.integers(0, n_classes, n).tolist()


@pytest.fixture
def cifar10_root(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data, labels = cifar_batch(3 if name != "test_batch" else 4, 10)
        if name == "data_batch_2":  # rows are the R plane, then G, then B, each row-major
            data[PLANTED_AT - 3] = PLANTED.transpose(2, 0, 1).reshape(-1)
            labels[PLANTED_AT - 3] = PLANTED_LABEL
        write_py2_pickle(
            folder / name,
            {
                "batch_label": Py2Str(f"batch {i + 1} of 5".encode()),
                "labels": labels,
                "data": data,
                "filenames": py2_strs([f"img_{i}_{j}.png" for j in range(len(labels))]),
            },
        )
    write_py2_pickle(
        folder / "batches.meta",
        {
            "num_cases_per_batch": 3,
            "label_names": py2_strs(CIFAR10_NAMES),
            "num_vis": 3072,
        },
    )
    return tmp_path


@pytest.fixture
def cifar100_root(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 7), ("test", 4)):
        data, fine = cifar_batch(n, 100)
        write_py2_pickle(
            folder / name,
            {
                "filenames": py2_strs([f"{name}_{j}.png" for j in range(n)]),
                "batch_label": Py2Str(name.encode()),
                "fine_labels": fine,
                "coarse_labels": [f // 5 for f in fine],
                "data": data,
            },
        )
    write_py2_pickle(
        folder / "meta",
        {
            "fine_label_names": py2_strs([f"fine{i}" for i in range(100)]),
            "coarse_label_names": py2_strs([f"coarse{i}" for i in range(20)]),
        },
    )
    return tmp_path


STL_PLANTED = RNG.integers(0, 256, (96, 96, 3), dtype=np.uint8)  # HWC


@pytest.fixture
def stl10_root(tmp_path: Path) -> Path:
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    for split, n in (("train", 4), ("test", 3), ("unlabeled", 5)):
        images = RNG.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        if split == "train":  # on disk: channel planes, each stored column-major
            images[1] = STL_PLANTED.transpose(2, 1, 0)
        images.tofile(folder / f"{split}_X.bin")
        if split != "unlabeled":
            labels = RNG.integers(1, 11, n, dtype=np.uint8)
            labels[1] = 10
            labels.tofile(folder / f"{split}_y.bin")
    return tmp_path


# --- comparisons ----------------------------------------------------------------------------


def assert_same(ours: list[Sample], theirs, split: str) -> None:
    assert len(ours) == len(theirs) > 0
    for i, sample in enumerate(ours):
        image, label = theirs[i]
        assert sample.key == f"{split}_{i:07d}"
        assert sample.image.mode == "RGB" and image.mode == "RGB"
        np.testing.assert_array_equal(np.array(sample.image), np.array(image))
        assert sample.label == label


class TvCIFAR10(tvd.CIFAR10):
    meta = {**tvd.CIFAR10.meta, "md5": None}

    def _check_integrity(self) -> bool:
        return True


class TvCIFAR100(tvd.CIFAR100):
    meta = {**tvd.CIFAR100.meta, "md5": None}

    def _check_integrity(self) -> bool:
        return True


class TvSTL10(tvd.STL10):
    def _check_integrity(self) -> bool:
        return True


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_matches_torchvision(cifar10_root: Path, split: str) -> None:
    theirs = TvCIFAR10(str(cifar10_root), train=split == "train", download=False)
    assert_same(list(sources.cifar10(cifar10_root, split)), theirs, split)
    direct = list(sources.cifar10(cifar10_root / "cifar-10-batches-py", split))
    assert_same(direct, theirs, split)
    assert sources.classes("cifar10", cifar10_root) == theirs.classes == CIFAR10_NAMES


def test_cifar10_planted_image_round_trips(cifar10_root: Path) -> None:
    samples = list(sources.cifar10(cifar10_root, "train"))
    assert len(samples) == 15
    np.testing.assert_array_equal(np.array(samples[PLANTED_AT].image), PLANTED)
    assert samples[PLANTED_AT].label == PLANTED_LABEL


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar100_matches_torchvision(cifar100_root: Path, split: str) -> None:
    theirs = TvCIFAR100(str(cifar100_root), train=split == "train", download=False)
    assert_same(list(sources.cifar100(cifar100_root, split)), theirs, split)
    coarse = list(sources.cifar100(cifar100_root, split, label="coarse"))
    assert [s.label for s in coarse] == [label // 5 for _, label in theirs]
    assert sources.classes("cifar100", cifar100_root) == theirs.classes
    assert sources.classes("cifar100", cifar100_root, label="coarse")[-1] == "coarse19"


@pytest.mark.parametrize("split", ["train", "test", "unlabeled"])
def test_stl10_matches_torchvision(stl10_root: Path, split: str) -> None:
    theirs = TvSTL10(str(stl10_root), split=split, download=False)
    ours = list(sources.stl10(stl10_root, split))
    assert_same(ours, theirs, split)
    assert all(s.label == -1 for s in ours) == (split == "unlabeled")
    assert_same(list(sources.stl10(stl10_root / "stl10_binary", split)), theirs, split)


def test_stl10_planted_image_round_trips(stl10_root: Path) -> None:
    sample = list(sources.stl10(stl10_root, "train"))[1]
    np.testing.assert_array_equal(np.array(sample.image), STL_PLANTED)
    assert sample.label == 9  # 10 on disk


def test_stl10_classes(stl10_root: Path) -> None:
    assert sources.classes("stl10", stl10_root) == sources.STL10_CLASSES
    names = [f"c{i}" for i in range(10)]
    (stl10_root / "stl10_binary" / "class_names.txt").write_text("\n".join(names) + "\n")
    assert sources.classes("stl10", stl10_root) == names
    assert TvSTL10(str(stl10_root), split="test", download=False).classes == names


def test_stl10_streams_one_image_at_a_time(stl10_root: Path, monkeypatch) -> None:
    monkeypatch.setattr(np, "fromfile", None)  # the X file must not be read whole
    reads: list[int] = []
    real_open = open

    class Spy(io.BufferedReader):
        def read(self, size: int | None = -1) -> bytes:
            reads.append(size)
            return super().read(size)

    def spy_open(path, mode="r", *args, **kwargs):
        if str(path).endswith("_X.bin"):
            return Spy(real_open(path, "rb", buffering=0))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy_open)
    assert len(list(sources.stl10(stl10_root, "unlabeled"))) == 5
    assert reads and max(reads) == sources.STL10_IMAGE_BYTES


def test_stl10_truncated_file_names_it(stl10_root: Path) -> None:
    x = stl10_root / "stl10_binary" / "unlabeled_X.bin"
    x.write_bytes(x.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"unlabeled_X\.bin.*not a multiple of 27648"):
        sources.stl10(stl10_root, "unlabeled")
    y = stl10_root / "stl10_binary" / "train_y.bin"
    y.write_bytes(y.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"train_y\.bin: 3 labels for 4 images"):
        sources.stl10(stl10_root, "train")


def test_missing_and_corrupt_files_are_named(tmp_path: Path, cifar10_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        sources.cifar100(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"test_X\.bin"):
        sources.stl10(tmp_path, "test")
    batch = cifar10_root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"data_batch_3: not a readable CIFAR pickle"):
        list(sources.cifar10(cifar10_root))
    (cifar10_root / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_4"):
        sources.cifar10(cifar10_root)
    with pytest.raises(ValueError, match="unknown split"):
        sources.cifar10(cifar10_root, "val")
    with pytest.raises(ValueError, match="unknown source"):
        sources.classes("mnist", tmp_path)


def test_cifar_pickle_cannot_run_code(cifar10_root: Path) -> None:
    batch = cifar10_root / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps({"data": print}, protocol=2))
    with pytest.raises(ValueError, match=r"refusing to load global \S*\.print"):
        list(sources.cifar10(cifar10_root, "test"))


# --- ImageFolder ----------------------------------------------------------------------------


def test_image_folder_matches_torchvision(tmp_path: Path) -> None:
    root = tmp_path / "images"
    files = {  # mixed modes, nesting, upper-case extensions and a non-image file
        "dog/b.png": "RGB",
        "dog/a.JPG": "RGB",
        "dog/sub/c.bmp": "L",
        "cat/z.png": "RGBA",
        "cat/y.webp": "RGB",
        "cat/notes.txt": None,
        "ant/x.tiff": "P",
        "ant/sub2/deep/w.ppm": "RGB",
    }
    for rel, mode in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if mode is None:
            path.write_text("not an image")
            continue
        pixels = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(path)
    theirs = tvd.ImageFolder(str(root))
    ours = list(sources.image_folder(root))
    assert_same(ours, theirs, "train")
    assert [s.label for s in ours] == [0, 0, 1, 1, 2, 2, 2]
    assert sources.classes("imagefolder", root) == theirs.classes == ["ant", "cat", "dog"]
    assert sources.IMG_EXTENSIONS == tvd.folder.IMG_EXTENSIONS
    (root / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no image files"):
        sources.image_folder(root)


def _tree(root: Path, per_class: int = 4) -> None:
    """`root/{ant,bee}/` and `root/{ant,bee}/sub/`, `per_class` // 2 grey PNGs in each."""
    for name in ("ant", "bee"):
        for folder in (root / name, root / name / "sub"):
            folder.mkdir(parents=True)
            for i in range(per_class // 2):
                Image.fromarray(RNG.integers(0, 256, (5, 5), dtype=np.uint8)).save(folder / f"{i}.png")


def test_links_up_an_image_folder_are_walked_once_and_keep_every_label(tmp_path: Path) -> None:
    """A link to the root once turned 8 images into hundreds, most labelled with the wrong class (the walk
    went round the loop until the path was too long); links to the folder itself or its parent never ended."""
    root = tmp_path / "images"
    _tree(root)
    (root / "ant" / "sub" / "up").symlink_to(root)  # the loop of the issue: the root again, from inside a class
    (root / "ant" / "bee").symlink_to(root / "bee")  # another class: its images are its own
    (root / "bee" / "sub" / "itself").symlink_to(".")
    (root / "bee" / "sub" / "parent").symlink_to("..")
    outside = tmp_path / "elsewhere"  # a link out of the tree is followed, as torchvision does
    outside.mkdir()
    Image.fromarray(RNG.integers(0, 256, (5, 5), dtype=np.uint8)).save(outside / "far.png")
    (root / "ant" / "far").symlink_to(outside)
    (root / "bee" / "far_again").symlink_to(outside)  # reached twice: listed once, at its first path
    listed = [(str(Path(f.path).relative_to(root)), f.label) for f in sources.image_folder_files(root)]
    assert listed == [
        ("ant/0.png", 0),
        ("ant/1.png", 0),
        ("ant/far/far.png", 0),
        ("ant/sub/0.png", 0),
        ("ant/sub/1.png", 0),
        ("bee/0.png", 1),
        ("bee/1.png", 1),
        ("bee/sub/0.png", 1),
        ("bee/sub/1.png", 1),
    ]


def test_a_class_folder_that_links_to_the_root_or_another_class_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _tree(root)
    (root / "cat").symlink_to(root / "ant")
    with pytest.raises(ValueError, match=f"^{root / 'cat'}: the same folder as {root / 'ant'} "):
        sources.image_folder_files(root)
    (root / "cat").unlink()
    (root / "all").symlink_to(root)
    with pytest.raises(ValueError, match=rf"^{root / 'all'}: the same folder as {root} \(a link\?\): its images"):
        sources.image_folder_files(root)


# --- decoding: wide pixels, decompression bombs ----------------------------------------------

# 16-bit grey values at the ends and in the middle of the range; PIL's `convert` made all but 0 and 255 white
WIDE = np.array([[0, 255, 256, 4000], [32768, 40000, 65280, 65535]], dtype=np.uint16)


def test_16_bit_images_are_scaled_to_8_bits_not_clipped_to_white(tmp_path: Path) -> None:
    """A 16-bit PNG (PIL's I;16), TIFF (I;16B) and PGM (I, on the 0..65535 scale): their 8 high bits."""
    folder = tmp_path / "images" / "grey"
    folder.mkdir(parents=True)
    Image.fromarray(WIDE).save(folder / "a.png")
    Image.frombytes("I;16B", (4, 2), WIDE.astype(">u2").tobytes()).save(folder / "b.tiff")
    (folder / "c.pgm").write_bytes(b"P5 4 2 65535\n" + WIDE.astype(">u2").tobytes())
    files = sources.image_folder_files(tmp_path / "images")
    assert [Image.open(f.path).mode for f in files] == ["I;16", "I;16B", "I"]
    high = np.array([[0, 0, 1, 15], [128, 156, 255, 255]], dtype=np.uint8)
    rgb = np.repeat(high[..., None], 3, axis=2)
    for file in files:
        assert np.array_equal(np.asarray(file.load().image), rgb), file.path
        assert np.array_equal(np.asarray(sources.read_image(file.path, "L", "--max-image-pixels")), high), file.path


def test_pixels_without_an_8_bit_scale_are_refused_naming_the_file(tmp_path: Path) -> None:
    """Float pixels and 32-bit integers outside 16 bits (a signed 16-bit TIFF reads as I): no scale to guess."""
    folder = tmp_path / "images" / "wide"
    folder.mkdir(parents=True)
    Image.fromarray(WIDE.astype(np.float32) / 65535).save(folder / "float.tiff")
    Image.fromarray(WIDE.astype(np.int32) - 1000).save(folder / "signed.tiff")
    float_file, signed_file = sources.image_folder_files(tmp_path / "images")
    with pytest.raises(sources.ImageRefused, match=r"float.tiff: float pixels \(mode F\) have no known 8-bit scale"):
        float_file.load()
    with pytest.raises(sources.ImageRefused, match="signed.tiff: 32-bit integer pixels -1000..64535 have no known"):
        signed_file.load()


def test_a_decompression_bomb_says_what_it_is_and_how_to_allow_it(tmp_path: Path) -> None:
    """200 million pixels in a 25 kB PNG: PIL refuses it before decoding; the error is no "unreadable image"."""
    path = bomb_png(tmp_path / "bomb.png")
    with pytest.raises(sources.ImageTooLarge) as refused:
        sources.ImageFile("train_0000000", str(path), 0).load()
    assert str(refused.value) == (
        f"{path}: 200000000 pixels, over PIL's decompression-bomb limit of 178956970 (twice "
        "PIL.Image.MAX_IMAGE_PIXELS): a damaged or hostile file, or a huge image; if it is genuine, allow it with "
        "--max-image-pixels=200000000 (0: no limit)"
    )


# --- Fashion-MNIST on the real files --------------------------------------------------------


@needs_fashion_mnist
def test_fashion_mnist_real_files_match_torchvision(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in sources.FASHION_MNIST_DIR.glob("*.gz"):  # torchvision wants them extracted
        with gzip.open(gz, "rb") as src, open(raw / gz.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    for split, n in (("train", 60000), ("test", 10000)):
        theirs = tvd.FashionMNIST(str(tmp_path), train=split == "train", download=False)
        ours = list(sources.fashion_mnist(split=split))
        assert len(ours) == len(theirs) == n
        assert [s.label for s in ours] == theirs.targets.tolist()
        pixels = np.stack([np.array(s.image) for s in ours])
        np.testing.assert_array_equal(pixels, theirs.data.numpy())
        assert ours[-1].key == f"{split}_{n - 1:07d}"
    assert sources.classes("fashion-mnist", tmp_path) == theirs.classes
