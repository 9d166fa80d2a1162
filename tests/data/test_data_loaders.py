"""Benchmark loaders: Hub benchmarks (load_dataset monkeypatched), official SOP/In-Shop folders,
image folders and generic datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from vpdml.data.loaders import load_dml_dataset


def hub_like_dataset(num_classes: int, images_per_class: int = 2) -> DatasetDict:
    """A per-image train/test DatasetDict with the Hub copies' schema (image, label ClassLabel)."""
    features = Features({"image": ImageFeature(), "label": ClassLabel(num_classes=num_classes)})

    def part(first_image: int) -> Dataset:
        labels = [c for c in range(num_classes) for _ in range(images_per_class)]
        images = [Image.new("RGB", (2, 2), (c, first_image, 0)) for c in labels]
        return Dataset.from_dict({"image": images, "label": labels}, features=features)

    return DatasetDict({"train": part(0), "test": part(1)})


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace datasets.load_dataset; record the call and return whatever `returns` holds."""
    record: dict[str, Any] = {}

    def fake_load_dataset(path: str, **kwargs: Any) -> Any:
        record["path"], record["kwargs"] = path, kwargs
        return record["returns"]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return record


def write_jpeg(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 5), color).save(path, format="JPEG")


def original_labels(dataset: Dataset) -> set[int]:
    return set(dataset["original_label"][:])


@pytest.mark.parametrize(
    ("name", "hub_id", "num_classes", "num_train"),
    [
        ("cub200", "bentrevett/caltech-ucsd-birds-200-2011", 200, 100),
        ("cars196", "pawlo2013/Cars196", 196, 98),
    ],
)
def test_hub_benchmarks_merge_per_image_splits_and_resplit_by_class(
    fake_hub: dict[str, Any], tmp_path: Path, name: str, hub_id: str, num_classes: int, num_train: int
) -> None:
    fake_hub["returns"] = hub_like_dataset(num_classes, images_per_class=1)
    splits = load_dml_dataset(name, cache_dir=tmp_path)
    assert fake_hub["path"] == hub_id and fake_hub["kwargs"]["cache_dir"] == str(tmp_path)
    assert original_labels(splits.train) == set(range(num_train))
    assert original_labels(splits.test) == set(range(num_train, num_classes))
    # both per-image splits are merged: every class has its image from "train" and from "test"
    assert splits.train.num_rows == 2 * num_train
    assert splits.num_train_classes == num_train
    assert splits.train.features["label"] == Value("int64")


def test_hub_benchmark_with_unexpected_class_count_fails_clearly(fake_hub: dict[str, Any]) -> None:
    fake_hub["returns"] = hub_like_dataset(10)
    with pytest.raises(ValueError, match="expected 200 classes"):
        load_dml_dataset("cub200")


def test_generic_hub_dataset_with_custom_columns(fake_hub: dict[str, Any]) -> None:
    base = hub_like_dataset(6)["train"]
    fake_hub["returns"] = base.rename_columns({"image": "img", "label": "fine_label"}).add_column(
        "extra", list(range(base.num_rows))
    )
    splits = load_dml_dataset("someone/flowers", image_column="img", label_column="fine_label", revision="v1")
    assert fake_hub["path"] == "someone/flowers" and fake_hub["kwargs"]["revision"] == "v1"
    assert splits.name == "someone/flowers"
    assert splits.train.column_names == ["image", "original_label", "label"]
    assert original_labels(splits.train) == {0, 1, 2} and original_labels(splits.test) == {3, 4, 5}


def test_validation_classes_come_from_training_classes(fake_hub: dict[str, Any]) -> None:
    fake_hub["returns"] = hub_like_dataset(200, images_per_class=1)
    splits = load_dml_dataset("cub200", validation_classes=20, seed=5)
    assert splits.validation is not None
    validation = original_labels(splits.validation)
    assert len(validation) == 20 and validation <= set(range(100))
    assert not validation & original_labels(splits.train)
    assert splits.num_train_classes == 80
    assert splits.eval_sets("validation").query is splits.validation
    # the splits are row selections of one table: the Hub images are not copied
    assert splits.train.data.num_rows == splits.validation.data.num_rows == 400


@pytest.mark.parametrize("folder", ["sop", "inshop"])
def test_folder_benchmarks_hold_out_validation_classes(tmp_path: Path, folder: str) -> None:
    make_folder = make_sop_folder if folder == "sop" else make_inshop_folder
    make_folder(tmp_path)
    splits = load_dml_dataset(folder, data_dir=tmp_path, validation_classes=1)
    assert splits.validation is not None and len(original_labels(splits.validation)) == 1
    assert not original_labels(splits.validation) & original_labels(splits.train)


def test_dataset_object_is_accepted_directly() -> None:
    splits = load_dml_dataset(hub_like_dataset(4)["train"], train_fraction=0.75)
    assert original_labels(splits.train) == {0, 1, 2} and original_labels(splits.test) == {3}


def test_bad_generic_datasets_fail_clearly() -> None:
    dataset = hub_like_dataset(4)["train"]
    with pytest.raises(KeyError, match="label_column="):
        load_dml_dataset(dataset, label_column="target")
    strings = dataset.cast_column("label", Value("string"))
    with pytest.raises(TypeError, match="class_encode_column"):
        load_dml_dataset(strings)
    with pytest.raises(ValueError, match="empty"):
        load_dml_dataset(dataset.select([]))


def test_singleton_training_classes_are_reported() -> None:
    dataset = hub_like_dataset(4, images_per_class=1)["train"]
    with pytest.warns(UserWarning) as warned:
        load_dml_dataset(dataset)
    messages = [str(warning.message) for warning in warned]
    assert any("2 classes in the 'dataset/train' split have a single image" in m for m in messages)
    assert any("2 classes in the 'dataset/test' split have a single image" in m for m in messages)


def make_sop_folder(root: Path) -> None:
    """Official layout: Ebay_*.txt with a header, paths relative to the root."""
    header = "image_id class_id super_class_id path\n"
    rows = {
        "train": [(1, 1), (2, 1), (3, 2), (4, 2), (5, 4), (6, 4)],
        "test": [(7, 11319), (8, 11319), (9, 11320), (10, 11320)],
    }
    for split, split_rows in rows.items():
        lines = [header]
        for image_id, class_id in split_rows:
            relative = f"bicycle_final/{class_id}_{image_id}.JPG"
            write_jpeg(root / relative, (image_id * 20, 0, 0))
            lines.append(f"{image_id} {class_id} 1 {relative}\n")
        (root / f"Ebay_{split}.txt").write_text("".join(lines))


def test_sop_folder_is_read_with_official_split(tmp_path: Path) -> None:
    make_sop_folder(tmp_path)
    splits = load_dml_dataset("sop", data_dir=tmp_path)
    assert splits.train["label"][:] == [0, 0, 1, 1, 2, 2]
    assert original_labels(splits.train) == {1, 2, 4}
    assert original_labels(splits.test) == {11319, 11320}
    image = splits.test[2]["image"]
    assert image.size == (6, 5) and abs(image.getpixel((3, 2))[0] - 180) < 10


def test_sop_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data_dir"):
        load_dml_dataset("sop")
    make_sop_folder(tmp_path)
    (tmp_path / "bicycle_final" / "1_1.JPG").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 6 image files are missing"):
        load_dml_dataset("sop", data_dir=tmp_path)
    write_jpeg(tmp_path / "bicycle_final" / "1_1.JPG")
    (tmp_path / "Ebay_test.txt").write_text("id class path\n1 2 x.jpg\n")
    with pytest.raises(ValueError, match="expected the header"):
        load_dml_dataset("sop", data_dir=tmp_path)
    (tmp_path / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n1 two 1 x.jpg\n")
    with pytest.raises(ValueError, match=r"Ebay_test.txt:2: class id 'two' is not an integer"):
        load_dml_dataset("sop", data_dir=tmp_path)


def make_inshop_folder(root: Path, *, official_layout: bool = False) -> None:
    """list_eval_partition.txt: image count, header, then `image_name item_id evaluation_status`."""
    rows = [
        ("img/MEN/Denim/id_00000002/01_1_front.jpg", "id_00000002", "train"),
        ("img/MEN/Denim/id_00000002/01_2_side.jpg", "id_00000002", "train"),
        ("img/MEN/Denim/id_00000007/01_1_front.jpg", "id_00000007", "train"),
        ("img/MEN/Denim/id_00000007/01_2_side.jpg", "id_00000007", "train"),
        ("img/WOMEN/Dresses/id_00000050/02_1_front.jpg", "id_00000050", "query"),
        ("img/WOMEN/Dresses/id_00000050/02_2_side.jpg", "id_00000050", "gallery"),
        ("img/WOMEN/Dresses/id_00000060/02_1_front.jpg", "id_00000060", "gallery"),
        ("img/WOMEN/Dresses/id_00000060/02_3_back.jpg", "id_00000060", "query"),
    ]
    text = f"{len(rows)}\nimage_name item_id evaluation_status\n"
    text += "".join(f"{name} {item} {status}\n" for name, item, status in rows)
    partition_dir, image_root = (root / "Eval", root / "Img") if official_layout else (root, root)
    partition_dir.mkdir(parents=True, exist_ok=True)
    (partition_dir / "list_eval_partition.txt").write_text(text)
    for name, _, _ in rows:
        write_jpeg(image_root / name)


@pytest.mark.parametrize("official_layout", [False, True])
def test_inshop_folder_gives_train_query_gallery(tmp_path: Path, official_layout: bool) -> None:
    make_inshop_folder(tmp_path, official_layout=official_layout)
    splits = load_dml_dataset("inshop", data_dir=tmp_path)
    assert splits.test is None
    assert splits.train["label"][:] == [0, 0, 1, 1] and original_labels(splits.train) == {2, 7}
    query, gallery, same_set = splits.eval_sets("test")
    assert not same_set
    assert query["original_label"][:] == [50, 60] and gallery["original_label"][:] == [50, 60]
    # one shared mapping: equal labels mean the same item in query and gallery
    assert query["label"][:] == gallery["label"][:] == [0, 1]


def test_inshop_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"list_eval_partition\.txt"):
        load_dml_dataset("inshop", data_dir=tmp_path)
    make_inshop_folder(tmp_path)
    partition = tmp_path / "list_eval_partition.txt"
    partition.write_text(partition.read_text().replace("gallery\n", "validation\n", 1))
    with pytest.raises(ValueError, match="evaluation_status 'validation'"):
        load_dml_dataset("inshop", data_dir=tmp_path)


def test_imagefolder_splits_class_folders_into_halves(tmp_path: Path) -> None:
    data_dir = tmp_path / "pets"
    for class_name in ("ant", "bee", "cat", "dog"):
        for index in range(2):
            write_jpeg(data_dir / class_name / f"{index}.jpg")
    splits = load_dml_dataset("imagefolder", data_dir=data_dir, cache_dir=tmp_path / "cache")
    names = splits.train.features["original_label"].names
    train_classes = {names[label] for label in original_labels(splits.train)}
    test_classes = {names[label] for label in original_labels(splits.test)}
    assert train_classes == {"ant", "bee"} and test_classes == {"cat", "dog"}
    assert splits.train.num_rows == 4 and splits.train[0]["image"].size == (6, 5)
    with_validation = load_dml_dataset(
        "imagefolder", data_dir=data_dir, cache_dir=tmp_path / "cache", validation_classes=1, seed=0
    )
    assert with_validation.validation is not None
    validation_classes = {names[label] for label in original_labels(with_validation.validation)}
    assert len(validation_classes) == 1 and validation_classes <= {"ant", "bee"}
