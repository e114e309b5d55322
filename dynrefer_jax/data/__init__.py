"""Data: the synthetic region world, real-dataset builders, tag parsing and the tf.data pipeline.

Modules (import what you need; nothing here imports TensorFlow eagerly):
  synthetic   the seeded synthetic region world (`generate`; builders/synthetic.py stores it).
  tokenizer   a tiny word-level tokenizer with T5 conventions (`build_tokenizer`, `load_tokenizer`).
  tags        rule-based tag-set parser (SPEC §7a).
  images      decoded images as the model sees them: upright (EXIF), 8-bit RGB (`upright_rgb8`).
  sources     one split of a TFDS region dataset read by region index (`RegionSource`).
  pipeline    `make_train_iterator`, `make_eval_iterator` (docs/ARCHITECTURE.md batch format).
  builders/   TFDS builders (ArrayRecord) of VG + DenseCap, GLaMM's caption files, RefCOCOg, COCO,
              OVAD and the synthetic world, with the readers of their public formats.
"""
