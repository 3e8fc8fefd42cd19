"""Dataset loaders: CIFAR-10/100 (python batches and image-folder copies), CUB-200-2011 and Stanford Cars.

The real subsets in ../shared/data are read where they are; the other layouts are written here, in the
official formats, small enough that every pixel and coordinate can be checked by hand.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import CIFAR10_MINI, REPO

torch = pytest.importorskip("torch")

from nasxserve.data import load_dataset  # noqa: E402
from nasxserve.data.decode import decode_images  # noqa: E402
from nasxserve.errors import DataError  # noqa: E402
from nasxserve.imaging import open_image, resize_to, to_model_mode, to_uint8_chw  # noqa: E402

CUB200_MINI = REPO.parent / "shared" / "data" / "cub200-mini"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
RED, BLUE = (255, 0, 0), (0, 0, 255)


def need(folder: Path) -> Path:
    if not folder.is_dir():
        pytest.skip(f"{folder} not found (expected ../shared/data next to the repository)")
    return folder


def expected_pixels(path: Path, size: int, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """What the loaders must store for ``path``: decoded by nasxserve.imaging, cropped, resized; (3, S, S)."""
    img = to_model_mode(open_image(path), 3)
    if window is not None:
        img = img.crop(window)
    return to_uint8_chw(resize_to(img, size, size))


def painted(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """A blue ``size`` = (w, h) RGB image with the pixels [x0, x1) x [y0, y1) of ``box`` red."""
    a = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    a[:, :] = BLUE
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = RED
    return Image.fromarray(a)


# ============================================================================ CIFAR: image-folder copy

@pytest.fixture(scope="module")
def cifar10_mini():
    return load_dataset(f"cifar10:{need(CIFAR10_MINI)}")


def test_cifar10_image_folder_copy_counts_shape_and_published_normalisation(cifar10_mini):
    d = cifar10_mini
    assert d.name == "cifar10" and d.classes == CIFAR_CLASSES
    assert (len(d.train), len(d.test)) == (5000, 1000) and d.val is None
    assert tuple(d.train.images.shape) == (5000, 3, 32, 32) and tuple(d.test.images.shape) == (1000, 3, 32, 32)
    assert torch.bincount(d.train.labels, minlength=10).tolist() == [500] * 10
    assert torch.bincount(d.test.labels, minlength=10).tolist() == [100] * 10
    assert (d.mean, d.std) == CIFAR10_STATS
    assert d.source == str(CIFAR10_MINI.resolve())
    assert d.train.boxes is None and d.train.parts is None
    last = sorted((CIFAR10_MINI / "test" / "truck").glob("*.png"))[-1]
    assert np.array_equal(d.test.images[999].numpy(), expected_pixels(last, 32))


# ============================================================================ CIFAR: python batches

# variant -> (folder, train batches, test batches, meta file, meta, labels key, number of classes)
CIFAR_LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
                {b"label_names": [n.encode() for n in CIFAR_CLASSES]}, b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta",
                 {b"fine_label_names": [f"fine_{k}".encode() for k in range(100)],
                  b"coarse_label_names": [f"coarse_{k}".encode() for k in range(20)]}, b"fine_labels", 100),
}


def write_cifar(root: Path, variant: str, per_batch: int = 4, seed: int = 0) -> tuple[dict, dict]:
    """Official-format batches for ``variant`` ("cifar10" or "cifar100") under ``root``, random pixels and
    labels; returns the images (N, 3, 32, 32) and the labels per split as written."""
    folder_name, train_files, test_files, meta_file, meta, labels_key, num_classes = CIFAR_LAYOUTS[variant]
    folder = root / folder_name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    images, labels = {}, {}
    for split, files in (("train", train_files), ("test", test_files)):
        images[split], labels[split] = [], []
        for name in files:
            x = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
            y = rng.integers(0, num_classes, size=per_batch).tolist()
            batch = {b"batch_label": name.encode(), b"data": x.reshape(per_batch, 3072), labels_key: y,
                     b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
            if variant == "cifar100":
                batch[b"coarse_labels"] = [k % 20 for k in y]
            (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
            images[split].append(x)
            labels[split] += y
        images[split] = np.concatenate(images[split])
    (folder / meta_file).write_bytes(pickle.dumps(meta, protocol=2))
    return images, labels


@pytest.mark.parametrize("variant,stats,classes", [("cifar10", CIFAR10_STATS, CIFAR_CLASSES),
                                                   ("cifar100", CIFAR100_STATS, [f"fine_{k}" for k in range(100)])])
@pytest.mark.parametrize("give", ["parent", "folder itself"])
def test_cifar_batches_round_trip_labels_and_pixels(tmp_path: Path, variant, stats, classes, give):
    images, labels = write_cifar(tmp_path, variant)
    folder = next(tmp_path.iterdir())
    d = load_dataset(f"{variant}:{tmp_path if give == 'parent' else folder}")
    assert d.name == variant and d.classes == classes and (d.mean, d.std) == stats
    assert d.source == str(folder.resolve())
    for split in ("train", "test"):
        s = getattr(d, split)
        assert s.labels.tolist() == labels[split]
        assert np.array_equal(s.images.numpy(), images[split])
    # channel-planar rows: value (c, y, x) of image i is data[i, 1024 c + 32 y + x]
    flat = images["train"].reshape(len(images["train"]), 3072)
    assert d.train.raw(3)[7, 11, 2] == flat[3, 2 * 1024 + 7 * 32 + 11]
    assert d.train.raw(3)[0, 31, 0] == flat[3, 31]


def test_cifar_batches_resize_like_image_files(tmp_path: Path):
    images, _ = write_cifar(tmp_path, "cifar10", per_batch=2)
    d = load_dataset(f"cifar10:{tmp_path}", image_size=16)
    assert tuple(d.train.images.shape) == (10, 3, 16, 16)
    expected = to_uint8_chw(resize_to(Image.fromarray(images["train"][3].transpose(1, 2, 0)), 16, 16))
    assert np.array_equal(d.train.images[3].numpy(), expected)


def test_cifar_label_out_of_range_is_refused_with_the_rows(tmp_path: Path):
    write_cifar(tmp_path, "cifar10", per_batch=3)
    batch_file = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch = pickle.loads(batch_file.read_bytes(), encoding="bytes")
    batch[b"labels"][1] = 10
    batch_file.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match="labels outside 0..9 in row 1") as e:
        load_dataset(f"cifar10:{tmp_path}")
    assert "data_batch_2" in str(e.value) and "nasx data inspect cifar10:" in str(e.value)


def test_cifar_batches_cannot_run_code(tmp_path: Path):
    write_cifar(tmp_path, "cifar10", per_batch=1)

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": Payload()}))
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        load_dataset(f"cifar10:{tmp_path}")


def test_cifar_missing_files_name_the_layout_and_the_source(tmp_path: Path):
    with pytest.raises(DataError) as e:
        load_dataset(f"cifar100:{tmp_path}")
    message = str(e.value)
    assert "cifar-100-python/" in message and "train, test, meta" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message and "train/<class>" in message
    write_cifar(tmp_path, "cifar10", per_batch=1)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataError, match="lacks data_batch_4; expected PATH = cifar-10-batches-py/"):
        load_dataset(f"cifar10:{tmp_path}")
    with pytest.raises(DataError, match="cifar10 needs a path"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="no bounding boxes"):
        load_dataset(f"cifar10:{tmp_path}", crop="bbox")


# ============================================================================ CUB-200-2011 (real subset)

@pytest.fixture(scope="module")
def cub():
    return load_dataset(f"cub200:{need(CUB200_MINI)}")


@pytest.fixture(scope="module")
def cub_cropped():
    return load_dataset(f"cub200:{need(CUB200_MINI)}", image_size=64, crop="bbox")


def read_table(path: Path) -> dict[int, list[str]]:
    return {int(line.split()[0]): line.split()[1:] for line in path.read_text().splitlines() if line.strip()}


@pytest.fixture(scope="module")
def cub_meta():
    """Image id -> (path, class id, is_train), read here independently of the loader."""
    images = read_table(CUB200_MINI / "images.txt")
    labels = read_table(CUB200_MINI / "image_class_labels.txt")
    split = read_table(CUB200_MINI / "train_test_split.txt")
    return {i: (CUB200_MINI / "images" / images[i][0], int(labels[i][0]), split[i][0] == "1") for i in sorted(images)}


def test_cub_mini_counts_classes_and_labels(cub, cub_meta):
    assert cub.name == "cub200" and cub.source == str(CUB200_MINI.resolve())
    assert cub.classes == ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross",
                           "004.Groove_billed_Ani", "005.Crested_Auklet"]
    assert (len(cub.train), len(cub.test)) == (150, 132)
    assert tuple(cub.train.images.shape) == (150, 3, 224, 224) and cub.image_size == (224, 224)
    assert (cub.mean, cub.std) == IMAGENET_STATS
    for split, is_train in (("train", True), ("test", False)):
        expected = [c - 1 for _, c, t in cub_meta.values() if t == is_train]     # classes 1..5 -> labels 0..4
        assert getattr(cub, split).labels.tolist() == expected


def test_cub_mini_images_are_in_id_order(cub, cub_meta):
    train = [path for path, _, t in cub_meta.values() if t]
    test = [path for path, _, t in cub_meta.values() if not t]
    assert np.array_equal(cub.train.images[0].numpy(), expected_pixels(train[0], 224))
    assert np.array_equal(cub.test.images[-1].numpy(), expected_pixels(test[-1], 224))


def test_cub_mini_boxes_are_clipped_into_the_stored_image(cub):
    for s in (cub.train, cub.test):
        assert s.boxes.shape == (len(s), 4)
        assert (s.boxes >= 0).all() and (s.boxes <= 224).all()
        assert (s.boxes[:, 2] > s.boxes[:, 0]).all() and (s.boxes[:, 3] > s.boxes[:, 1]).all()
    # image 47 (500x275, test) has the box 5 127 496 131: x1 = 501 is past the edge, clipped to 500
    i = cub_test_position(47)
    assert np.allclose(cub.test.boxes[i], [5 * 224 / 500, 127 * 224 / 275, 224, 258 * 224 / 275])


def test_cub_mini_parts_by_hand(cub):
    assert cub.part_names == ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg",
                              "left wing", "nape", "right eye", "right leg", "right wing", "tail", "throat"]
    assert cub.train.parts.shape == (150, 15, 3) and cub.test.parts.shape == (132, 15, 3)
    # image 1 (500x335, test, first test image): "1 2 312.0 182.0 1" (beak), "1 1 0.0 0.0 0" (back)
    assert np.allclose(cub.test.parts[0, 1], [312 * 224 / 500, 182 * 224 / 335, 1])
    assert np.array_equal(cub.test.parts[0, 0], [0, 0, 0])
    visible = cub.test.parts[:, :, 2] == 1
    assert visible.sum() > 1000 and (cub.test.parts[visible][:, :2] <= 224).all()


def test_cub_mini_bbox_crop(cub_cropped, cub_meta):
    d = cub_cropped
    assert d.image_size == (64, 64)
    assert np.array_equal(d.train.boxes, np.tile([0, 0, 64, 64], (150, 1)).astype(np.float32))
    # image 47's box (5, 127)..(501, 258) is cut at the image's right edge, 500: no padding in the crop
    path = cub_meta[47][0]
    i = cub_test_position(47)
    assert np.array_equal(d.test.images[i].numpy(), expected_pixels(path, 64, (5, 127, 500, 258)))
    # image 1: box 60 27 325 304 -> crop (60, 27)..(385, 331); the beak (312, 182) moves into it
    assert np.allclose(d.test.parts[0, 1], [(312 - 60) * 64 / 325, (182 - 27) * 64 / 304, 1])
    visible = d.test.parts[:, :, 2] == 1
    assert (d.test.parts[visible][:, :2] >= 0).all() and (d.test.parts[visible][:, :2] <= 64).all()


def cub_test_position(image_id: int) -> int:
    """Position of a CUB-mini test image among the test images (id order)."""
    split = read_table(CUB200_MINI / "train_test_split.txt")
    return [i for i in sorted(split) if split[i][0] == "0"].index(image_id)


# ============================================================================ CUB-200-2011 (written here)

CUB_CLASSES = {k: f"{k:03d}.Bird_{k}" for k in range(1, 9)}
CUB_PARTS = ["back", "left eye", "right wing"]
# id, class id, train?, (width, height), box x y w h. Only classes 3 and 7 have images; ids have gaps.
CUB_IMAGES = [
    (10, 3, True, (40, 32), (4, 6, 20, 16)),
    (12, 7, True, (48, 36), (10, 4, 30, 24)),
    (15, 3, False, (40, 40), (20, 8, 25, 20)),     # reaches x = 45, past the right edge
    (20, 7, False, (44, 32), (0, 0, 44, 32)),
    (21, 3, True, (36, 36), (8, 8, 20, 20)),
    (30, 7, False, (40, 36), (2, 2, 30, 30)),
]


def write_cub(root: Path) -> Path:
    """A CUB_200_2011 folder under ``root`` with CUB_IMAGES as PNGs (blue, the clipped box red). Parts: back at
    the box centre, left eye not visible, right wing at (1, 1), outside most boxes. Returns the folder."""
    folder = root / "CUB_200_2011"
    (folder / "parts").mkdir(parents=True)
    images, labels, split, boxes, locs = [], [], [], [], []
    for image_id, class_id, train, size, (x, y, w, h) in CUB_IMAGES:
        rel = f"{CUB_CLASSES[class_id]}/bird_{image_id}.png"
        (folder / "images" / CUB_CLASSES[class_id]).mkdir(parents=True, exist_ok=True)
        painted(size, (x, y, min(x + w, size[0]), min(y + h, size[1]))).save(folder / "images" / rel)
        images.append(f"{image_id} {rel}")
        labels.append(f"{image_id} {class_id}")
        split.append(f"{image_id} {int(train)}")
        boxes.append(f"{image_id} {x:.1f} {y:.1f} {w:.1f} {h:.1f}")
        locs += [f"{image_id} 1 {x + w / 2:.1f} {y + h / 2:.1f} 1", f"{image_id} 2 0.0 0.0 0",
                 f"{image_id} 3 1.0 1.0 1"]
    files = {"images.txt": images, "image_class_labels.txt": labels, "train_test_split.txt": split,
             "bounding_boxes.txt": boxes, "classes.txt": [f"{k} {n}" for k, n in CUB_CLASSES.items()],
             "parts/parts.txt": [f"{k} {n}" for k, n in enumerate(CUB_PARTS, 1)], "parts/part_locs.txt": locs}
    for name, lines in files.items():
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def test_cub_classes_are_those_with_images_in_id_order(tmp_path: Path):
    folder = write_cub(tmp_path)
    d = load_dataset(f"cub200:{tmp_path}", image_size=16)
    assert d.source == str(folder.resolve())
    assert d.classes == ["003.Bird_3", "007.Bird_7"]
    assert d.train.labels.tolist() == [0, 1, 0] and d.test.labels.tolist() == [0, 1, 1]   # ids 10 12 21 | 15 20 30
    assert d.part_names == CUB_PARTS
    # image 10 (40x32), box (4, 6)..(24, 22), back at (14, 14), right wing at (1, 1)
    assert np.allclose(d.train.boxes[0], [4 * 16 / 40, 6 * 16 / 32, 24 * 16 / 40, 22 * 16 / 32])
    assert np.allclose(d.train.parts[0], [[14 * 16 / 40, 14 * 16 / 32, 1], [0, 0, 0], [16 / 40, 16 / 32, 1]])
    # image 15 (40x40): box (20, 8)..(45, 28) clipped to x1 = 40
    assert np.allclose(d.test.boxes[0], [20 * 16 / 40, 8 * 16 / 40, 16, 28 * 16 / 40])


def test_cub_bbox_crop_keeps_only_the_box(tmp_path: Path):
    write_cub(tmp_path)
    d = load_dataset(f"cub200:{tmp_path / 'CUB_200_2011'}", image_size=16, crop="bbox")
    red = np.array(RED, dtype=np.uint8).reshape(3, 1, 1)
    for s in (d.train, d.test):
        assert (s.images.numpy() == red).all()           # every stored pixel comes from inside a box
        assert np.array_equal(s.boxes, np.tile([0, 0, 16, 16], (len(s), 1)).astype(np.float32))
    # image 10: crop (4, 6)..(24, 22) is 20x16; back (14, 14) -> (8, 8); right wing (1, 1) is outside: invisible
    assert np.allclose(d.train.parts[0], [[8, 8, 1], [0, 0, 0], [0, 0, 0]])
    # image 20's box is the whole image, so (1, 1) stays visible
    assert np.allclose(d.test.parts[1, 2], [16 / 44, 16 / 32, 1])


def test_cub_missing_files_name_the_layout(tmp_path: Path):
    with pytest.raises(DataError) as e:
        load_dataset(f"cub200:{tmp_path}")
    message = str(e.value)
    assert "CUB_200_2011" in message and "images.txt" in message and "parts/part_locs.txt" in message
    assert "https://www.vision.caltech.edu/datasets/cub_200_2011/" in message
    folder = write_cub(tmp_path)
    (folder / "bounding_boxes.txt").unlink()
    with pytest.raises(DataError, match="lacks bounding_boxes.txt; expected PATH = the CUB_200_2011 folder"):
        load_dataset(f"cub200:{folder}")
    with pytest.raises(DataError, match="cub200 needs a path"):
        load_dataset("cub200")


def test_cub_metadata_problems_stop_loading_and_point_to_inspect(tmp_path: Path):
    folder = write_cub(tmp_path)
    (folder / "images" / "003.Bird_3" / "bird_21.png").unlink()
    with pytest.raises(DataError) as e:
        load_dataset(f"cub200:{folder}", image_size=16)
    message = str(e.value)
    assert "1 problem in the metadata" in message and "bird_21.png" in message
    assert f"nasx data inspect cub200:{folder.resolve()}" in message


def test_image_size_must_be_a_multiple_of_four(tmp_path: Path):
    write_cub(tmp_path)
    with pytest.raises(DataError, match="image size 30x30 must be a multiple of 4"):
        load_dataset(f"cub200:{tmp_path}", image_size=30)


# ============================================================================ Stanford Cars

CARS_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi TTS Coupe 2012"]
# fname, class (1-based), (width, height), box x1 y1 x2 y2 as in the devkit: 1-based, inclusive
CARS = {
    "train": [("00001.png", 1, (40, 30), (5, 4, 24, 20)),
              ("00002.jpg", 2, (36, 36), (1, 1, 36, 36)),
              ("00003.png", 3, (48, 32), (10, 5, 53, 30)),      # x2 = 53: past the right edge (48)
              ("00004.png", 1, (32, 40), (3, 9, 30, 28))],
    "test": [("00001.png", 3, (44, 36), (2, 2, 40, 20)),
             ("00002.png", 2, (40, 40), (11, 13, 30, 40))],
}
FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def write_cars(root: Path, test_annos_in_devkit: bool = False) -> Path:
    """The devkit layout with CARS (blue images, the box pixels red); the test annotations sit in ``root``
    itself unless ``test_annos_in_devkit``. Returns ``root``."""
    from scipy.io import savemat

    (root / "devkit").mkdir(parents=True)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": np.array([CARS_CLASSES], dtype=object)})
    for split, rows in CARS.items():
        (root / f"cars_{split}").mkdir()
        annos = np.zeros((1, len(rows)), dtype=[(f, "O") for f in FIELDS])
        for i, (fname, cls, size, (x1, y1, x2, y2)) in enumerate(rows):
            painted(size, (x1 - 1, y1 - 1, min(x2, size[0]), min(y2, size[1]))).save(
                root / f"cars_{split}" / fname, **({"quality": 95} if fname.endswith(".jpg") else {}))
            values = [np.array([[v]], dtype=np.uint16) for v in (x1, y1, x2, y2)]
            annos[0, i] = (*values, np.array([[cls]], dtype=np.uint8), fname)
        name = "cars_train_annos.mat" if split == "train" else "cars_test_annos_withlabels.mat"
        folder = root / "devkit" if split == "train" or test_annos_in_devkit else root
        savemat(folder / name, {"annotations": annos})
    return root


@pytest.fixture(scope="module")
def cars_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cars(tmp_path_factory.mktemp("cars") / "stanford_cars")


def test_cars_counts_labels_names_and_clipped_boxes(cars_root: Path):
    d = load_dataset(f"stanford-cars:{cars_root}", image_size=16)
    assert d.name == "stanford-cars" and d.classes == CARS_CLASSES and d.source == str(cars_root.resolve())
    assert (len(d.train), len(d.test)) == (4, 2) and (d.mean, d.std) == IMAGENET_STATS
    assert d.train.labels.tolist() == [0, 1, 2, 0] and d.test.labels.tolist() == [2, 1]
    # 00001.png (40x30), pixels 5..24 x 4..20 (1-based) = [4, 24) x [3, 20)
    assert np.allclose(d.train.boxes[0], [4 * 16 / 40, 3 * 16 / 30, 24 * 16 / 40, 20 * 16 / 30])
    # 00003.png (48x32): x2 = 53 is clipped to 48
    assert np.allclose(d.train.boxes[2], [9 * 16 / 48, 4 * 16 / 32, 16, 30 * 16 / 32])
    assert np.array_equal(d.train.images[0].numpy(), expected_pixels(cars_root / "cars_train" / "00001.png", 16))
    assert d.train.parts is None and d.part_names is None


def test_cars_bbox_crop_is_the_box_region(cars_root: Path):
    d = load_dataset(f"stanford-cars:{cars_root}", image_size=16, crop="bbox")
    red = np.array(RED, dtype=np.uint8).reshape(3, 1, 1)
    png = [0, 2, 3]
    assert (d.train.images.numpy()[png] == red).all()    # exactly the red box: no blue row or column
    assert (d.test.images.numpy() == red).all()
    jpeg = d.train.images[1].numpy().astype(int)         # a lossy copy of the same picture
    assert np.abs(jpeg - red).max() < 40
    assert np.array_equal(d.train.boxes, np.tile([0, 0, 16, 16], (4, 1)).astype(np.float32))


def test_cars_annotations_may_sit_in_devkit(tmp_path: Path):
    root = write_cars(tmp_path / "cars", test_annos_in_devkit=True)
    assert len(load_dataset(f"stanford-cars:{root}", image_size=8).test) == 2


def test_cars_missing_files_name_the_layout(tmp_path: Path):
    with pytest.raises(DataError) as e:
        load_dataset(f"stanford-cars:{tmp_path}")
    message = str(e.value)
    assert "cars_train/" in message and "cars_meta.mat" in message and "devkit" in message
    assert "https://ai.stanford.edu/~jkrause/cars/car_dataset.html" in message
    root = write_cars(tmp_path / "cars")
    (root / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DataError, match="has no cars_test_annos_withlabels.mat in devkit/ or in itself"):
        load_dataset(f"stanford-cars:{root}")


# ============================================================================ decoding

def test_parallel_decoding_matches_serial_and_collects_every_bad_file(tmp_path: Path):
    good = []
    for k in range(3):
        good.append(tmp_path / f"{k}.png")
        painted((12 + 4 * k, 12), (k, 0, 8, 8)).save(good[-1])
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    files = [good[i % 3] for i in range(300)]
    files[10] = files[290] = tmp_path / "bad.jpg"
    files[150] = tmp_path / "gone.png"
    serial = decode_images(files, (8, 8), workers=1)
    parallel = decode_images(files, (8, 8), workers=2)
    assert np.array_equal(serial.pixels, parallel.pixels) and np.array_equal(serial.sizes, parallel.sizes)
    assert [(p.kind, Path(p.where).name) for p in parallel.problems] == \
        [("unreadable", "bad.jpg"), ("missing-file", "gone.png"), ("unreadable", "bad.jpg")]
    assert np.array_equal(parallel.pixels[11], expected_pixels(good[2], 8))
    assert parallel.sizes[11].tolist() == [20, 12] and parallel.sizes[10].tolist() == [-1, -1]


def test_imagefolder_lists_unreadable_images(tmp_path: Path):
    from conftest import make_imagefolder
    root = make_imagefolder(tmp_path / "data", classes=2, train_per_class=3, test_per_class=2)
    (root / "train" / "class_1" / "0001.png").write_bytes(b"garbage")
    (root / "test" / "class_0" / "0000.png").write_bytes(b"")
    with pytest.raises(DataError) as e:
        load_dataset(f"imagefolder:{root}")
    message = str(e.value)
    assert "2 problems in the images" in message and "class_1/0001.png" in message and "class_0/0000.png" in message
    assert f"nasx data inspect imagefolder:{root.resolve()}" in message


# ============================================================================ held-out validation split

def test_validation_rows_are_a_stratified_fixed_share_that_leaves_every_class_a_training_image():
    from nasxserve.data.base import validation_rows
    labels = np.array([0] * 20 + [1] * 10 + [2] * 1 + [3] * 5)
    rows = validation_rows(labels, 0.1)
    assert np.bincount(labels[rows], minlength=4).tolist() == [2, 1, 0, 0]   # round(0.5) = 0; one image stays
    assert np.array_equal(rows, np.sort(rows)) and np.array_equal(rows, validation_rows(labels, 0.1))
    assert np.bincount(labels[validation_rows(labels, 0.45)], minlength=4).tolist() == [9, 4, 0, 2]


def _pixel_keys(images) -> set[bytes]:
    return {bytes(x) for x in images.images.numpy().reshape(len(images), -1)}


@pytest.mark.parametrize("spec", ["cifar10", "imagefolder", "cub200", "cifar10-pickles"])
def test_a_held_out_validation_split_is_disjoint_from_train_and_test(spec: str, tmp_path: Path):
    if spec == "cifar10-pickles":
        write_cifar(tmp_path, "cifar10", per_batch=20)
        source = f"cifar10:{tmp_path}"
    else:
        source = f"{spec}:{need(CUB200_MINI if spec == 'cub200' else CIFAR10_MINI)}"
    whole = load_dataset(source)
    held = load_dataset(source, val_share=0.1)
    assert whole.val is None and held.val is not None and held.val_held_out == 0.1
    assert len(held.train) + len(held.val) == len(whole.train) and len(held.test) == len(whole.test)
    train, val, test = _pixel_keys(held.train), _pixel_keys(held.val), _pixel_keys(held.test)
    assert not val & train and not val & test
    per_class = np.bincount(whole.train.labels.numpy(), minlength=whole.num_classes)
    expected = np.minimum(np.round(0.1 * per_class), np.maximum(per_class - 1, 0))
    assert np.bincount(held.val.labels.numpy(), minlength=whole.num_classes).tolist() == expected.astype(int).tolist()
    assert held.mean == whole.mean and held.summary()["val_split"].startswith("0.1 of the training split")
    assert load_dataset(source, val_share=0.1).val.images.equal(held.val.images)     # the same on every load
