"""A Hugging Face ``datasets`` dataset as a :class:`CaptionedImageSource`.

``path`` is one of:

- a local folder saved with ``Dataset.save_to_disk`` (it has ``state.json``): read with ``load_from_disk``;
- a local image folder (images, with captions in a ``metadata.jsonl``/``.csv`` whose ``file_name`` column names
  each image): read with datasets' ``imagefolder`` builder;
- a Hub dataset id (``user/name``): ``load_dataset(path, name=..., split=..., revision=...)``, from the local HF
  cache when it is there (the download, if any, is datasets' own).

The image and caption columns are configurable (defaults ``image`` and ``text``, imagefolder's names). Images are
read undecoded (``datasets.Image(decode=False)``) and decoded here, so a broken image is a :class:`BadSample`
counted by the cache builder rather than an exception inside ``datasets``. Selection and the bad-data policy are
COCO's: rows without an image or with a missing / empty caption are skipped and counted.

Needs the optional ``datasets`` package (``pip install "cm_lightning[hf]"``), imported on first use.
"""

from __future__ import annotations

from pathlib import Path

from cm_lightning.data.coco import (
    READER_VERSION,
    Candidate,
    SelectedPairs,
    check_selection_args,
    pairs_digest,
    select_pairs,
)
from cm_lightning.data.images import load_image, load_image_bytes
from cm_lightning.data.sources import BadSample, CaptionedImage, SkipReport
from cm_lightning.errors import UserError

MISSING_IMAGE = "missing image"


def import_datasets():
    try:
        import datasets
    except ImportError:
        raise UserError('data=hf needs the datasets package: pip install "cm_lightning[hf]"') from None
    return datasets


def load_hf_dataset(path: str, *, split: str, name: str | None = None, revision: str | None = None):
    """The dataset at ``path`` (saved folder, image folder or Hub id) as one ``datasets.Dataset`` split."""
    datasets = import_datasets()
    folder = Path(path).expanduser()
    try:
        if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():
            data = datasets.load_from_disk(str(folder))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise UserError(f"hf dataset {path}: no split {split!r}; it has {', '.join(data)} (data.split)")
                data = data[split]
            return data
        if folder.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(folder), split=split)
        if folder.exists() or path.startswith((".", "/", "~")):
            raise UserError(f"hf dataset {path} is not a folder (data.path: a folder or a Hub dataset id)")
        return datasets.load_dataset(path, name, split=split, revision=revision)
    except UserError:
        raise
    except (FileNotFoundError, ValueError) as error:  # datasets' errors for a bad id, split or layout
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"hf dataset {path} (split {split}): {first}") from None
    except Exception as error:  # noqa: BLE001 - network/hub errors from datasets have many types
        raise UserError(f"hf dataset {path} (split {split}) could not be loaded: {type(error).__name__}: "
                        f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}") from None


class HFDatasetSource(SelectedPairs):
    """Rows of a ``datasets`` dataset; ``len`` is the number of usable pairs, at most ``num_pairs``.

    Args:
        path: a saved dataset folder, an image folder with ``metadata.jsonl``, or a Hub dataset id.
        split / name / revision: which split, config and revision (Hub ids).
        image_column / caption_column: the columns holding the image and its caption.
        num_pairs / seed / min_side: as for COCO (None = every usable row).
    """

    name = "hf"

    def __init__(self, path: str, *, split: str = "train", name: str | None = None, revision: str | None = None,
                 image_column: str = "image", caption_column: str = "text", num_pairs: int | None = None,
                 seed: int = 0, min_side: int = 0):
        check_selection_args(num_pairs, 1, "first", seed)
        datasets = import_datasets()
        self.path, self.split, self.config_name, self.revision = str(path), split, name, revision
        self.image_column, self.caption_column = image_column, caption_column
        self.num_pairs, self.seed, self.min_side = num_pairs, seed, min_side
        self.skipped = SkipReport()
        data = load_hf_dataset(self.path, split=split, name=name, revision=revision)
        for what, column in (("image_column", image_column), ("caption_column", caption_column)):
            if column not in data.column_names:
                raise UserError(f"hf dataset {path}: no column {column!r} (data.{what}); its columns are "
                                f"{', '.join(data.column_names)}")
        if isinstance(data.features[image_column], datasets.Image):
            data = data.cast_column(image_column, datasets.Image(decode=False))  # we decode (bad images -> BadSample)
        self.data = data
        captions = data[caption_column]  # one column read: no image is touched
        has_image = [value is not None for value in data.select_columns([image_column])[image_column]]
        candidates = [Candidate(f"{self.path}[{split}][{i}]", str(i), [(caption, True)])
                      for i, caption in enumerate(captions)]
        self._pairs = select_pairs(candidates, base_dir=Path(""), num_pairs=num_pairs, seed=seed,
                                   captions_per_image=1, caption_choice="first", skipped=self.skipped,
                                   where=f"hf dataset {path}",
                                   missing=lambda c: None if has_image[int(c.path)] else MISSING_IMAGE)
        self._digest = pairs_digest(self._pairs)

    def __getitem__(self, index: int) -> CaptionedImage:
        row, caption, key = self._pairs[index]
        value = self.data[int(row)][self.image_column]
        if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
            if value.get("bytes"):
                image = load_image_bytes(value["bytes"], key, min_side=self.min_side)
            elif value.get("path"):
                image = load_image(Path(value["path"]), key, min_side=self.min_side)
            else:
                raise BadSample(key, MISSING_IMAGE)
        elif hasattr(value, "convert"):  # a PIL image (a column of another feature type that decodes)
            from cm_lightning.data.preprocess import to_rgb

            image = to_rgb(value)
        else:
            raise BadSample(key, "unreadable image", f"column {self.image_column!r} holds {type(value).__name__}")
        return CaptionedImage(image, caption, key)

    def fingerprint(self) -> dict:
        return {
            "source": self.name,
            "reader_version": READER_VERSION,
            "path": str(Path(self.path).expanduser().resolve()) if Path(self.path).expanduser().exists() else self.path,
            "split": self.split,
            "config_name": self.config_name,
            "revision": self.revision,
            "dataset_fingerprint": getattr(self.data, "_fingerprint", None),
            "columns": [self.image_column, self.caption_column],
            "num_pairs": self.num_pairs,
            "seed": self.seed,
            "min_side": self.min_side,
            "pairs_sha256": self._digest,
        }

    def __repr__(self) -> str:
        return f"HFDatasetSource({self.path!r}, split={self.split!r}, pairs={len(self)})"
