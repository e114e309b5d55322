"""TFDS builders of the region datasets (base.py: features, metadata, order), and the readers of
the public annotation formats they use (DATA_FORMATS.md; common.py cleans their records).

Importing this package registers the builders with TFDS, so `tfds build` finds them with
`--imports dynrefer_jax.data.builders`:

  dataset    builder             splits            manual files (the builder's instructions)
  vg         dynrefer_vg         train, val, test  VG V1.2 + densecap_splits.json
  vg_reg     dynrefer_vg_reg     test              GLaMM's VG test_caption.json
  refcocog   dynrefer_refcocog   train, val        MDETR train + GLaMM val captions
  coco       dynrefer_coco       val               instances_val2017.json
  ovad       dynrefer_ovad       test              ovad2000.json
  synthetic  dynrefer_synthetic  train, val, test, heldout  (none: rendered from its config)

`build` prepares one (ArrayRecord, what tools/prepare_data.py and the synthetic world run) and
`load` opens a prepared one; data/sources.py reads their splits by region.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

import tensorflow_datasets as tfds

from dynrefer_jax.data.builders import base, coco, common, ovad, refcocog, synthetic, vg

BUILDERS = {"vg": vg.DynreferVg, "vg_reg": vg.DynreferVgReg,
            "refcocog": refcocog.DynreferRefcocog, "coco": coco.DynreferCoco,
            "ovad": ovad.DynreferOvad, "synthetic": synthetic.DynreferSynthetic}
FILE_FORMAT = "array_record"  # random access by example index (tfds.data_source)


@contextlib.contextmanager
def _lock(data_dir: str):
  """Serialises builds into one data dir (processes of one job may start together)."""
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, ".build.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def load(dataset: str, data_dir: str, config=None) -> base.RegionBuilder:
  """The builder of `dataset` (a key of BUILDERS) over `data_dir`, prepared or not."""
  return BUILDERS[dataset](data_dir=data_dir, config=config, file_format=FILE_FORMAT)


def build(dataset: str, data_dir: str, manual_dir: str | None = None, *, config=None,
          overwrite: bool = False) -> base.RegionBuilder:
  """Prepares `dataset` under data_dir (data_dir/<builder name>/[config/]<version>/) unless it
  is there already; returns its builder. TFDS writes into a temporary folder and renames it at
  the end, so a killed build leaves nothing that reads as prepared."""
  builder = load(dataset, data_dir, config)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  with _lock(data_dir):
    if overwrite or not builder.is_prepared():
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=manual_dir, download_mode=mode))
  return load(dataset, data_dir, config)
