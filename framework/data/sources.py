"""Dataset sources: readers that turn a dataset on disk into a stream of `Sample`s.

Each reader yields samples one at a time and never holds more than one source file
in memory, so `framework.data.shards.write_shards` can convert any of them to WebDataset
shards. Readers take the dataset's own on-disk format (no download happens here).
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


@dataclass(frozen=True)
class Sample:
    """One labelled image; `label` is -1 for unlabelled data (STL-10's unlabeled split)."""

    key: str
    image: Image.Image
    label: int


def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz", root / "raw" / stem, root / "raw" / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{stem}(.gz) not found under {root}")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST family's format), gzipped or not, into a uint8 array."""
    with _open_maybe_gz(path) as f:
        zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte IDX file")
        shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated IDX file ({data.size} of {int(np.prod(shape))} bytes)")
    return data.reshape(shape)


def _check_split(split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(allowed)}")


def fashion_mnist(root: str | Path = FASHION_MNIST_DIR, split: str = "train") -> Iterator[Sample]:
    """Fashion-MNIST from its IDX files (`train-*` / `t10k-*`, gzipped or not)."""
    root = Path(root)
    _check_split(split, ("train", "test"))
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels in split {split!r}")
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        yield Sample(f"{split}_{i:07d}", Image.fromarray(pixels), int(label))


# --- CIFAR-10 / CIFAR-100: python pickle batches -------------------------------------------

CIFAR10_DIR, CIFAR100_DIR = "cifar-10-batches-py", "cifar-100-python"


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler resolving only what CIFAR batches hold (numpy arrays), never arbitrary code."""

    def find_class(self, module: str, name: str):
        if module.split(".")[0] == "numpy" or (module, name) == ("_codecs", "encode"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _load_pickle(path: Path) -> dict[str, Any]:
    """Load one CIFAR pickle (Python 2 or 3 written) with its keys as `str`."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CIFAR batch file not found")
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, encoding="latin1").load()
    except Exception as e:  # pickle raises many types on corrupt input
        raise ValueError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(entry).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _cifar_dir(root: str | Path, folder: str, probe: str) -> Path:
    """`root/folder`, or `root` itself when it already is that folder (holds `probe`)."""
    root = Path(root)
    for candidate in (root / folder, root):
        if (candidate / probe).is_file():
            return candidate
    raise FileNotFoundError(f"{root / folder / probe} not found (nor {root / probe})")


def _cifar_batches(paths: list[Path], split: str, label_key: str) -> Iterator[Sample]:
    index = 0
    for path in paths:
        entry = _load_pickle(path)
        try:
            data = np.asarray(entry["data"], dtype=np.uint8)
            labels = entry[label_key]
        except KeyError as e:
            raise ValueError(f"{path}: missing key {e.args[0]!r} in CIFAR batch") from None
        if data.size % 3072 or data.size // 3072 != len(labels):
            n = len(labels)
            raise ValueError(f"{path}: {data.size} data bytes do not fit {n} 32x32x3 images")
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        for pixels, label in zip(images, labels, strict=True):
            yield Sample(f"{split}_{index:07d}", Image.fromarray(pixels), int(label))
            index += 1


def cifar10(root: str | Path, split: str = "train") -> Iterator[Sample]:
    """CIFAR-10 from `root/cifar-10-batches-py/` (or that folder itself), one batch at a time."""
    _check_split(split, ("train", "test"))
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    folder = _cifar_dir(root, CIFAR10_DIR, names[0])
    paths = [folder / name for name in names]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: CIFAR-10 batch file not found")
    return _cifar_batches(paths, split, "labels")


def cifar100(root: str | Path, split: str = "train", label: str = "fine") -> Iterator[Sample]:
    """CIFAR-100 from `root/cifar-100-python/{train,test}`; `label`: fine (100) or coarse (20)."""
    _check_split(split, ("train", "test"))
    if label not in ("fine", "coarse"):
        raise ValueError(f"unknown CIFAR-100 label {label!r}; expected fine or coarse")
    folder = _cifar_dir(root, CIFAR100_DIR, split)
    return _cifar_batches([folder / split], split, f"{label}_labels")


# --- STL-10: raw uint8 binaries ------------------------------------------------------------

STL10_DIR = "stl10_binary"
STL10_IMAGE_BYTES = 3 * 96 * 96  # 27648
STL10_CLASSES = [
    "airplane",
    "bird",
    "car",
    "cat",
    "deer",
    "dog",
    "horse",
    "monkey",
    "ship",
    "truck",
]


def _stl_iter(x_path: Path, labels: np.ndarray | None, split: str, n: int) -> Iterator[Sample]:
    with open(x_path, "rb") as f:
        for i in range(n):
            buf = f.read(STL10_IMAGE_BYTES)
            if len(buf) != STL10_IMAGE_BYTES:
                raise ValueError(f"{x_path}: file ended early at image {i} of {n}")
            # on disk: (C, W, H) per image, i.e. column-major; PIL wants (H, W, C)
            pixels = np.frombuffer(buf, dtype=np.uint8).reshape(3, 96, 96).transpose(2, 1, 0)
            label = -1 if labels is None else int(labels[i]) - 1
            yield Sample(f"{split}_{i:07d}", Image.fromarray(np.ascontiguousarray(pixels)), label)


def stl10(root: str | Path, split: str = "train") -> Iterator[Sample]:
    """STL-10 from `root/stl10_binary/{split}_X.bin` (+ `_y.bin`), read one image at a time.

    Labels are 1..10 on disk and yielded as 0..9; the unlabeled split yields -1.
    """
    _check_split(split, ("train", "test", "unlabeled"))
    root = Path(root)
    folder = root / STL10_DIR if (root / STL10_DIR).is_dir() else root
    x_path = folder / f"{split}_X.bin"
    if not x_path.is_file():
        raise FileNotFoundError(f"{x_path}: STL-10 image file not found")
    size = x_path.stat().st_size
    if size % STL10_IMAGE_BYTES:
        raise ValueError(f"{x_path}: size {size} is not a multiple of {STL10_IMAGE_BYTES} bytes (truncated?)")
    n = size // STL10_IMAGE_BYTES
    labels = None
    if split != "unlabeled":
        y_path = folder / f"{split}_y.bin"
        if not y_path.is_file():
            raise FileNotFoundError(f"{y_path}: STL-10 label file not found")
        labels = np.fromfile(y_path, dtype=np.uint8)
        if len(labels) != n:
            raise ValueError(f"{y_path}: {len(labels)} labels for {n} images in {x_path.name}")
        if labels.size and (labels.min() < 1 or labels.max() > 10):
            lo, hi = labels.min(), labels.max()
            raise ValueError(f"{y_path}: labels must be 1..10, found {lo}..{hi}")
    return _stl_iter(x_path, labels, split, n)


# --- decoding a file: 8 bits per channel, a decompression bomb named -------------------------


class ImageRefused(ValueError):
    """An image that decodes but is refused: over PIL's decompression-bomb limit (`ImageTooLarge`), or of
    pixels without a known 8-bit scale (floats, integers beyond 16 bits)."""


class ImageTooLarge(ImageRefused):
    """More pixels than PIL's decompression-bomb limit (twice `PIL.Image.MAX_IMAGE_PIXELS`)."""


# Modes of 16 bits per pixel. PIL's `convert` to L or RGB clips these (and I, F) at 255 instead of
# scaling them: every 16-bit pixel above 255 turns white.
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def eight_bit(image: Image.Image) -> Image.Image:
    """`image` with 8 bits per channel: 16-bit pixels (modes I;16*, and I, which PIL decodes a 16-bit
    PGM to, on the same 0..65535 scale) shifted right by 8, as torchvision's uint16-to-uint8 and PIL's
    own 16-bit RGB PNG decoding do. Pixels without a known scale raise `ImageRefused`: floats
    (mode F), 32-bit integers outside 0..65535. The 8-bit modes are returned as they are."""
    if image.mode == "F":
        raise ImageRefused("float pixels (mode F) have no known 8-bit scale: convert the file to 8 or 16 bits")
    if image.mode not in (*_SIXTEEN_BIT, "I"):
        return image
    pixels = np.asarray(image)
    if image.mode == "I" and pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
        raise ImageRefused(
            f"32-bit integer pixels {pixels.min()}..{pixels.max()} have no known 8-bit scale (16-bit ones hold "
            "0..65535): convert the file to 8 or 16 bits"
        )
    return Image.fromarray((pixels >> 8).astype(np.uint8))


def read_image(file: str | IO[bytes], mode: str, allow: str) -> Image.Image:
    """The image in `file` (a path or a binary file) decoded whole, with 8 bits per channel (`eight_bit`:
    not clipped), in `mode` (L or RGB). An image over PIL's decompression-bomb limit raises `ImageTooLarge`
    saying how to allow it: with `allow`, the caller's setting of `PIL.Image.MAX_IMAGE_PIXELS` (e.g.
    `--max-image-pixels`); what else PIL raises on a damaged file goes through."""
    try:
        with Image.open(file) as image:
            image.load()
            narrow = eight_bit(image)
            return narrow if narrow.mode == mode else narrow.convert(mode)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(_too_large(exc, allow)) from None


def _too_large(exc: Image.DecompressionBombError, allow: str) -> str:
    """What a decompression-bomb image is and how to allow it, from PIL's `Image size (N pixels) exceeds ...`."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = found.group(1) if found else "N"
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return (
        f"{pixels} pixels, over PIL's decompression-bomb limit of {limit} (twice PIL.Image.MAX_IMAGE_PIXELS): "
        f"a damaged or hostile file, or a huge image; if it is genuine, allow it with {allow}={pixels} (0: no limit)"
    )


# --- ImageFolder: root/<class>/**/<image> --------------------------------------------------

# Same as torchvision.datasets.folder.IMG_EXTENSIONS (tests check they agree).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _folder_classes(root: Path) -> list[str]:
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not names:
        raise FileNotFoundError(f"{root}: no class sub-folders found")
    return names


def _folder_files(root: Path, names: list[str]) -> list[tuple[str, int]]:
    """(path, class index) in torchvision's `make_dataset` order, links to folders followed as torchvision
    does, but each real folder (device, inode) walked once, at its first path in name order: a link up the
    tree (to itself, a parent, the root) or to a class folder is not walked, so there is no loop and no
    image under two labels. `ValueError` for a class folder that is the root or another class's folder."""
    seen: dict[tuple[int, int], str] = {}
    for folder in (str(root), *(str(root / name) for name in names)):
        if (first := _claim(seen, folder)) != folder:
            raise ValueError(f"{folder}: the same folder as {first} (a link?): its images would have two labels")
    files = []
    for index, name in enumerate(names):
        found = [
            os.path.join(dirpath, fname)
            for dirpath, fnames in sorted(_walk_once(root / name, seen))
            for fname in sorted(fnames)
            if fname.lower().endswith(IMG_EXTENSIONS)
        ]
        if not found:
            raise FileNotFoundError(f"{root / name}: no image files ({', '.join(IMG_EXTENSIONS)})")
        files += [(path, index) for path in found]
    return files


def _claim(seen: dict[tuple[int, int], str], path: str) -> str:
    """The first path in `seen` to the real folder (device, inode) `path` is or links to: `path` if none
    (then recorded)."""
    stat = os.stat(path)
    return seen.setdefault((stat.st_dev, stat.st_ino), path)


def _walk_once(top: Path, seen: dict[tuple[int, int], str]) -> Iterator[tuple[str, list[str]]]:
    """(folder, file names) of `top` and its sub-folders, links to folders followed, depth first in name
    order, skipping a folder already in `seen` (which gains every folder walked): no loop, no folder twice."""
    for dirpath, dirnames, fnames in os.walk(top, followlinks=True):
        dirnames.sort()
        dirnames[:] = [d for d in dirnames if _claim(seen, path := os.path.join(dirpath, d)) == path]
        yield dirpath, fnames


@dataclass(frozen=True)
class ImageFile:
    """One file of an image folder, listed but not read: `load()` reads it as a `Sample`.

    What `write_shards(..., processes=N)` hands its worker processes: a path travels to a
    worker for a few bytes, where the decoded pixels of the file would cost a copy.
    """

    key: str
    path: str
    label: int

    def load(self) -> Sample:
        """The file as an RGB `Sample` (`read_image`); `ValueError` naming the file if it cannot be decoded,
        `ImageRefused` naming it if it is refused (a decompression bomb: `augssl shards --max-image-pixels`)."""
        try:
            return Sample(self.key, read_image(self.path, "RGB", "--max-image-pixels"), self.label)
        except ImageRefused as exc:
            raise type(exc)(f"{self.path}: {exc}") from None
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, ... on a damaged file
            raise ValueError(f"{self.path}: unreadable image ({type(exc).__name__}: {exc})") from None


def image_folder_files(root: str | Path, split: str = "train") -> list[ImageFile]:
    """The files of an ImageFolder tree in `image_folder`'s order, keys and labels, none read yet."""
    root = Path(root)
    files = _folder_files(root, _folder_classes(root))
    return [ImageFile(f"{split}_{i:07d}", path, label) for i, (path, label) in enumerate(files)]


def image_folder(root: str | Path, split: str = "train") -> Iterator[Sample]:
    """Any ImageFolder tree (`root/<class>/.../<image>`), ordered and labelled like torchvision's.

    `split` only prefixes the keys: point `root` at the split's own folder. The files are listed
    at once (a missing or empty folder raises here), read one at a time.
    """
    return (file.load() for file in image_folder_files(root, split))


# --- registry --------------------------------------------------------------------------------

SOURCES: dict[str, Callable[..., Iterator[Sample]]] = {
    "fashion-mnist": fashion_mnist,
    "cifar10": cifar10,
    "cifar100": cifar100,
    "stl10": stl10,
    "imagefolder": image_folder,
}
"""Reader by name; each is called as `SOURCES[name](root, split=...)`."""


def classes(name: str, root: str | Path, label: str = "fine") -> list[str]:
    """Class names of source `name` at `root`, indexed by label (`label`: CIFAR-100 fine/coarse)."""
    if name == "fashion-mnist":
        return list(FASHION_MNIST_CLASSES)
    if name == "cifar10":
        meta = _load_pickle(_cifar_dir(root, CIFAR10_DIR, "batches.meta") / "batches.meta")
        return [str(c) for c in meta["label_names"]]
    if name == "cifar100":
        if label not in ("fine", "coarse"):
            raise ValueError(f"unknown CIFAR-100 label {label!r}; expected fine or coarse")
        meta = _load_pickle(_cifar_dir(root, CIFAR100_DIR, "meta") / "meta")
        return [str(c) for c in meta[f"{label}_label_names"]]
    if name == "stl10":
        root = Path(root)
        folder = root / STL10_DIR if (root / STL10_DIR).is_dir() else root
        names_file = folder / "class_names.txt"
        return names_file.read_text().splitlines() if names_file.is_file() else list(STL10_CLASSES)
    if name == "imagefolder":
        return _folder_classes(Path(root))
    raise ValueError(f"unknown source {name!r}; expected one of {', '.join(SOURCES)}")


# Where `augssl shards SOURCE` looks when no ROOT is given.
DEFAULT_ROOTS: dict[str, Path] = {"fashion-mnist": FASHION_MNIST_DIR}
