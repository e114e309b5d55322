"""DynRefer's contextual visual embedding weights: `cvem_align.*` and `cvem_mlp.*` (§1.2).

Targets are keyed by the composition's attribute names (`cvem_align/...` for
`models.aligner.DeformableAligner`, `cvem_mlp/...` for `models.fusion.FusionMLP`):

  cvem_align.{value_proj,offset_mask,output_proj}.weight [out, in] → cvem_align/{..}/kernel [in, out]
  cvem_align.offset_mask_dw.weight [C, 2, 3, 3]                     → cvem_align/offset_mask_dw/kernel [3, 3, 2, C]
  cvem_mlp.0.* / cvem_mlp.2.*                                       → cvem_mlp/linear0/* / cvem_mlp/linear2/*

Keys of other components in the same state dict (e.g. `cem_memory`, `Qformer.*`) are ignored.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from dynrefer_jax.convert.common import Rule, convert

RULES = [
    Rule(r"cvem_align\.(value_proj|offset_mask|output_proj)\.weight", "cvem_align/{0}/kernel",
         "linear"),
    Rule(r"cvem_align\.(value_proj|offset_mask|output_proj)\.bias", "cvem_align/{0}/bias"),
    # Grouped conv (groups = C over concat[x, ref]): the plain permute keeps PyTorch's grouping.
    Rule(r"cvem_align\.offset_mask_dw\.weight", "cvem_align/offset_mask_dw/kernel", "conv2d"),
    Rule(r"cvem_align\.offset_mask_dw\.bias", "cvem_align/offset_mask_dw/bias"),
    Rule(r"cvem_mlp\.(0|2)\.weight", "cvem_mlp/linear{0}/kernel", "linear"),
    Rule(r"cvem_mlp\.(0|2)\.bias", "cvem_mlp/linear{0}/bias"),
]


def convert_cvem(sd: Mapping[str, np.ndarray],
                 expected: Mapping[str, tuple[int, ...]] | None) -> dict[str, np.ndarray]:
  """DynRefer state dict → {`cvem_align/...` | `cvem_mlp/...`: array}.

  Raises common.ConversionError naming every unmapped, unused, missing or mis-shaped key.
  """
  selected = {k: v for k, v in sd.items() if k.startswith("cvem_")}
  return convert(selected, RULES, expected, source_name="DynRefer cvem_*")
