"""Multi-view construction on the device (SPEC §2, §8): view boxes, crop+resize, pHash selection.

The crop function is `views.crop_resize.crop_resize` (not re-exported: the name would shadow its
module).
"""

from dynrefer_jax.views.boxes import (CANDIDATE_TS, boxes_in_views, validate_boxes,
                                      view_boxes)
from dynrefer_jax.views.crop_resize import CLIP_MEAN, CLIP_STD, normalize
from dynrefer_jax.views.select import build_views, sample_train_ts, select_ts
