r"""Builds real datasets from their public files: the TFDS builders of dynrefer_jax/data/builders.

  python tools/prepare_data.py --dataset vg vg_reg coco ovad refcocog --manual_dir RAW \
      --data_dir DATA

RAW holds the public files in their released layout (each builder's MANUAL_DOWNLOAD_INSTRUCTIONS,
the README's "Data" section); DATA is the TFDS data dir the configs read (--config.data.dir).
Each dataset is written as ArrayRecord, one example per image (at its own resolution) with all
its regions, under
DATA/dynrefer_<dataset>/<version>/ (TFDS writes into a temporary folder and renames it when
complete, so a killed run leaves nothing that reads as built). A bad record is repaired or
skipped and counted, never fatal: the report of every split (what was repaired or skipped, and
why) is printed and kept in the dataset's metadata.json. A dataset already built is left as it
is unless --overwrite.

This is what `tfds build dynrefer_<dataset> --imports dynrefer_jax.data.builders --manual_dir RAW
--data_dir DATA --file_format array_record` does, plus the checks and the report (tools/
tfds_build.py runs TFDS's own build command).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DATASETS = ("vg", "vg_reg", "refcocog", "coco", "ovad")
SUMMARY = ("regions_in", "regions_out", "images_out", "repaired", "skipped")


def prepare(datasets, manual_dir: str, data_dir: str, *, overwrite: bool = False) -> dict:
  """Builds `datasets`; returns {dataset: {split: report}} (builders/common.Report.to_json)."""
  from dynrefer_jax.data import builders  # pylint: disable=import-outside-toplevel
  out = {}
  for dataset in datasets:
    builder = builders.build(dataset, data_dir, manual_dir, overwrite=overwrite)
    out[dataset] = {split: meta["report"]
                    for split, meta in builder.info.metadata["splits"].items()}
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dataset", required=True, nargs="+", choices=DATASETS)
  p.add_argument("--manual_dir", required=True, help="the public files (see the README)")
  p.add_argument("--data_dir", required=True, help="TFDS data dir (--config.data.dir)")
  p.add_argument("--overwrite", action="store_true", help="rebuild datasets already built")
  args = p.parse_args(argv)
  from dynrefer_jax.data import builders  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(args.manual_dir):
    print(f"error: --manual_dir: no such directory: {args.manual_dir}", file=sys.stderr)
    return 2
  try:
    for dataset in args.dataset:  # every dataset's files checked before any build starts
      builders.BUILDERS[dataset].manual_paths(args.manual_dir)
  except builders.base.ManualFilesMissing as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  reports = prepare(args.dataset, args.manual_dir, args.data_dir, overwrite=args.overwrite)
  print(json.dumps({d: {s: {k: r[k] for k in SUMMARY} for s, r in splits.items()}
                    for d, splits in reports.items()}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
