"""The TFDS builders: gta5, synthia, cityscapes and cityscapes_pseudo.

Features are stored without TensorFlow: `image` holds the original encoded image file
(decoded by the loader), `label` the train-id map as an 8-bit PNG, `name` the frame's name
and `classes` the train ids present in the frame. The builder's metadata (metadata.json)
repeats names and classes per split, so the sampler's label-info table loads without
reading the images.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from fada_jax.data import sources as sources_lib
from fada_jax.data.builders import encode, layout
from fada_jax.errors import UserError

_MANUAL_INSTRUCTIONS = """\
The manual dir is the data root of the release's folder layouts:
  gta5/images/*.png, gta5/labels/*.png
  synthia/RAND_CITYSCAPES/RGB/*.png, synthia/RAND_CITYSCAPES/GT/LABELS/*.png
  cityscapes/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png,
  cityscapes/gtFine/{train,val}/<city>/*_gtFine_labelIds.png
"""


def _features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      # Encoded bytes: tfds.features.Image would need TensorFlow to encode and decode.
      "image": tfds.features.Tensor(shape=(), dtype=np.object_),
      "label": tfds.features.Tensor(shape=(), dtype=np.object_),
      "name": tfds.features.Text(),
      "classes": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
  })


class SegmentationConfig(tfds.core.BuilderConfig):
  """A class setting (19 or 16) and, for pseudo labels, the folder holding them."""

  def __init__(self, *, num_classes: int, pseudo_label_dir: str | None = None,
               image_size: tuple[int, int] | None = None, **kwargs):
    super().__init__(**kwargs)
    self.num_classes = num_classes
    self.pseudo_label_dir = pseudo_label_dir
    self.image_size = None if image_size is None else tuple(int(v) for v in image_size)


class _SegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared generation: list the frames, encode them in worker processes, in order."""

  VERSION = tfds.core.Version(layout.VERSION)
  RELEASE_NOTES = {layout.VERSION: "Train-id labels, encoded images, classes present."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS
  BUILDER_CONFIGS = [
      SegmentationConfig(name="classes19", num_classes=19, description="19 classes"),
      SegmentationConfig(name="classes16", num_classes=16, description="16 classes"),
  ]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    # No checksums or metadata files beside the code (nothing is downloaded). TFDS's
    # default looks the package up with `importlib_resources`, which is not installed.
    return None

  def __init__(self, *, workers: int = 1, skip_corrupt: bool = False,
               progress: bool = True, uncompressed_images: bool = False, **kwargs):
    self._workers = max(1, int(workers))
    self._uncompressed_images = bool(uncompressed_images)
    self._skip_corrupt = skip_corrupt
    self._progress = progress
    self.skipped: list[str] = []
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.name} frames with train-id labels ({self.builder_config.num_classes} classes)",
        features=_features(),
        metadata=tfds.core.MetadataDict(),
        # The stored order is the sorted file order, so indices match the folder sources.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = Path(dl_manager.manual_dir)
    pseudo_dir = self.builder_config.pseudo_label_dir
    metadata = self.info.metadata
    metadata["num_classes"] = self.builder_config.num_classes
    if pseudo_dir:
      metadata["pseudo_label_dir"] = str(Path(pseudo_dir).resolve())
    image_size = getattr(self.builder_config, "image_size", None)
    if image_size is not None:
      metadata["image_size"] = list(image_size)
    metadata["images"] = ("NPY, uncompressed records" if self._uncompressed_images else
                          "the image files' own bytes" if image_size is None else "PNG")
    metadata["labels"] = ("NPY, zlib level 1" if self._uncompressed_images else "PNG")
    generators = {}
    for split in layout.splits(self.name, image_size):
      source = sources_lib.make_source(self.name, root, split, self.builder_config.num_classes,
                                       pseudo_label_dir=pseudo_dir)
      generators[split] = self._generate_examples(split, source)
    return generators

  def _generate_examples(self, split: str, source: sources_lib.FolderSource
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    names: list[str] = []
    classes: list[list[int]] = []
    skipped: list[str] = []
    for index, record in self._encode_all(split, source):
      if isinstance(record, str):
        skipped.append(record)
        self.skipped.append(record)
        continue
      names.append(record["name"])
      classes.append(record["classes"].tolist())
      yield len(names) - 1, record
    self.info.metadata[split] = {"names": names, "classes": classes, "skipped": skipped}

  def _encode_all(self, split: str, source: sources_lib.FolderSource
                  ) -> Iterator[tuple[int, dict[str, Any] | str]]:
    tasks = [(index, self._skip_corrupt) for index in range(len(source))]
    bar = tqdm.tqdm(total=len(tasks), desc=f"{self.name}/{self.builder_config.name} {split}",
                    unit="frame", disable=not self._progress, dynamic_ncols=True)
    with bar:
      image_size = getattr(self.builder_config, "image_size", None)
      if self._workers == 1:
        encode.init_worker(source, image_size, self._uncompressed_images)
        results = map(encode.encode_in_worker, tasks)
      else:
        # spawn: the parent may hold threads (JAX, TFDS) that make fork unsafe.
        context = multiprocessing.get_context("spawn")
        pool = context.Pool(min(self._workers, len(tasks)), initializer=encode.init_worker,
                            initargs=(source, image_size, self._uncompressed_images))
        results = pool.imap(encode.encode_in_worker, tasks, chunksize=4)
      try:
        for result in results:
          bar.update(1)
          yield result
      finally:
        if self._workers > 1:
          pool.terminate()
          pool.join()


class Gta5(_SegmentationBuilder, skip_registration=True):
  """GTA5 (train): 24,966 frames, Cityscapes label ids."""
  name = "gta5"


class Synthia(_SegmentationBuilder, skip_registration=True):
  """SYNTHIA RAND_CITYSCAPES (train): 9,400 frames, 16-bit labels, 16 classes only."""
  name = "synthia"
  BUILDER_CONFIGS = [_SegmentationBuilder.BUILDER_CONFIGS[1]]


class Cityscapes(_SegmentationBuilder, skip_registration=True):
  """Cityscapes (train, val) with gtFine label ids."""
  name = "cityscapes"


class CityscapesPseudo(_SegmentationBuilder, skip_registration=True):
  """Cityscapes train images with the pseudo labels (train ids) of a given folder."""
  name = "cityscapes_pseudo"


_BUILDERS = {cls.name: cls for cls in (Gta5, Synthia, Cityscapes, CityscapesPseudo)}


def make_builder(name: str, output_dir: str | os.PathLike, num_classes: int,
                 pseudo_label_dir: str | os.PathLike | None = None,
                 image_size: tuple[int, int] | None = None, **kwargs
                 ) -> _SegmentationBuilder:
  """The builder of a dataset in a class setting, writing under `output_dir` (its train
  split at a training size (width, height) with `image_size`)."""
  layout.check_dataset(name)
  if name == "synthia" and num_classes != 16:
    raise UserError(f"SYNTHIA exists only in the 16-class setting, got num_classes={num_classes}")
  config_name = layout.config_name(name, num_classes, pseudo_label_dir, image_size)
  config: str | SegmentationConfig = config_name
  if image_size is not None:
    config = SegmentationConfig(name=config_name, num_classes=num_classes,
                                image_size=image_size,
                                description=f"{num_classes} classes, train frames at "
                                f"{image_size[0]}x{image_size[1]}")
  if name == "cityscapes_pseudo":
    # One config per pseudo-label folder, so two folders never share a prepared dataset.
    config = SegmentationConfig(name=config_name, num_classes=num_classes,
                                pseudo_label_dir=str(pseudo_label_dir),
                                description=f"{num_classes} classes, labels of {pseudo_label_dir}")
  return _BUILDERS[name](config=config, data_dir=os.fspath(output_dir),
                         file_format="array_record", **kwargs)
