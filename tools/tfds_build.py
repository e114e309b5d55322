"""`tfds build`, the command of TFDS itself, with the project's builders importable.

  python tools/tfds_build.py dynrefer_vg --imports dynrefer_jax.data.builders \
      --manual_dir RAW --data_dir DATA --file_format array_record

takes exactly `tfds build`'s flags and runs its code (tensorflow_datasets.scripts.cli.build).
The `tfds` console script of tensorflow-datasets 4.9.10 imports apache_beam when it starts, for
its convert_format command, and apache-beam would replace the pinned pillow and protobuf; this
starts the build command alone. tools/prepare_data.py is the project's command for the same
build (with a check of the manual files and the bad-record report).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> None:
  from absl import app  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.scripts.cli import build, cli_utils  # pylint: disable=import-outside-toplevel
  parser = cli_utils.make_flags_parser(build.Args, description="tfds build")
  app.run(lambda args: args.execute(), argv=[sys.argv[0], *(sys.argv[1:] if argv is None
                                                           else argv)],
          flags_parser=parser)


if __name__ == "__main__":
  main()
