"""Region captioning metrics (RefCOCOg, VG region captioning), as pycocoevalcap's COCOEvalCap.

SPEC §11: one region per image id; PTB tokenizer, then BLEU, METEOR 1.5, ROUGE-L and CIDEr-D
(document frequencies from the references of the evaluated set), all reported x100.

SPICE is left out: it needs Stanford CoreNLP models that pycocoevalcap downloads on first use,
and nothing may be downloaded at run time.
"""

from collections.abc import Mapping, Sequence
from typing import Any, Hashable

from dynrefer_jax.evaluators import common


def caption_metrics(gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, str],
                    meteor: Any = None) -> dict[str, float]:
  """BLEU-4, METEOR, ROUGE-L and CIDEr (x100) of one caption per id against its references.

  Args:
    gts: id -> reference captions (raw text; tokenized here).
    res: id -> generated caption (raw text). Must have the same ids as `gts`.
    meteor: an open pycocoevalcap `Meteor` to use; by default the process's shared one
      (common.shared_meteor: its JVM start and paraphrase-table load take seconds).

  Returns:
    {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}, corpus-level scores x100.
  """
  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  # pylint: enable=g-import-not-at-top
  if set(gts) != set(res):
    missing, extra = set(gts) - set(res), set(res) - set(gts)
    raise ValueError(f"ids differ: {len(missing)} without a prediction (e.g. "
                     f"{sorted(missing, key=str)[:3]}), {len(extra)} without references "
                     f"(e.g. {sorted(extra, key=str)[:3]})")
  if not gts:
    raise ValueError("no captions to evaluate")
  common.require_java("region captioning (BLEU, METEOR, ROUGE-L, CIDEr)")
  tokenizer = PTBTokenizer()
  # COCOEvalCap tokenizes references and predictions in two separate calls; so do we.
  gts_tok = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()})
  res_tok = tokenizer.tokenize({k: [{"caption": v}] for k, v in res.items()})

  bleu, _ = Bleu(4).compute_score(gts_tok, res_tok)
  if meteor is None:
    with common.shared_meteor() as scorer:
      meteor_score, _ = scorer.compute_score(gts_tok, res_tok)
  else:
    meteor_score, _ = meteor.compute_score(gts_tok, res_tok)
  rouge, _ = Rouge().compute_score(gts_tok, res_tok)
  cider, _ = Cider().compute_score(gts_tok, res_tok)
  return {"BLEU-4": 100 * bleu[3], "METEOR": 100 * meteor_score, "ROUGE-L": 100 * rouge,
          "CIDEr": 100 * cider}


@common.register("region_caption")
class RegionCaptionEvaluator(common.Evaluator):
  """Caption metrics keyed by image id (the protocol holds one region per image id).

  Reads batch "image_id" and "captions" (references), and preds "caption". With `key="region_id"`
  every region is its own entry (datasets with several regions per image, e.g. the synthetic
  world).
  """

  def rows(self, batch, preds, keep):
    return list(zip(common.take(batch[self.cfg.get("key", "image_id")], keep), common.take(batch["captions"], keep),
                    common.take(preds["caption"], keep)))

  def metrics(self, rows):
    gts, res = {}, {}
    for image_id, refs, caption in rows:
      image_id = int(image_id)
      if image_id in res:
        raise ValueError(f"image id {image_id} holds more than one region; region captioning "
                         "evaluates one region per image id (key='region_id' scores each region)")
      gts[image_id] = [refs] if isinstance(refs, str) else [str(r) for r in refs]
      res[image_id] = str(caption)
    return caption_metrics(gts, res)
