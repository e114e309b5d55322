"""The region-text loss with true prompts mixed in (synthetic world): labels worked out by hand."""

import jax
import jax.numpy as jnp
import numpy as np

from dynrefer_jax import losses
from dynrefer_jax.models.dynrefer import sample_rtc_texts

L = 3
CLASS_IDS = np.array([[11, 0, 0], [12, 0, 0]], np.int32)          # "the circle", "the star"
TEMPLATE_IDS = np.array([[21, 0, 0], [22, 0, 0], [23, 0, 0]], np.int32)  # red, red (2nd), blue
OWNER = np.array([0, 0, 1], np.int32)                               # templates 0,1 -> red


def test_siglip_with_diagonal_labels_equals_the_original():
  logits = jax.random.normal(jax.random.key(0), (4, 4)) * 3
  np.testing.assert_allclose(losses.siglip_loss(logits, labels=jnp.eye(4, dtype=bool)),
                             losses.siglip_loss(logits), rtol=1e-6)
  # by hand: -sum log sigmoid(y * l) / N
  y = 2 * np.eye(4) - 1
  ref = -np.sum(np.log(1 / (1 + np.exp(-y * np.asarray(logits))))) / 4
  np.testing.assert_allclose(losses.siglip_loss(logits), ref, rtol=1e-5)
  w = np.ones((4, 4), np.float32)
  w[0, 1] = 0
  ref_w = -np.sum(w * np.log(1 / (1 + np.exp(-y * np.asarray(logits))))) / 4
  np.testing.assert_allclose(losses.siglip_loss(logits, weights=w), ref_w, rtol=1e-5)


def test_every_region_takes_its_only_true_prompt_and_labels_follow_the_truth():
  # Region 0: a star with no positive attribute -> its only true prompt is "the star" (12).
  # Region 1: no category, red -> a red template (21 or 22).
  # Region 2: a star, blue unknown (-1), red negative -> "the star".
  # Region 3: no category, no positive attribute -> keeps its caption.
  text_ids = np.array([[1, 1, 1], [2, 2, 2], [3, 3, 3], [4, 4, 4]], np.int32)
  category = np.array([1, -1, 1, -1], np.int32)
  attributes = np.array([[0, 0], [1, 0], [0, -1], [0, 0]], np.int32)
  ids, labels, weights = sample_rtc_texts(jax.random.key(3), text_ids, category, attributes,
                                          CLASS_IDS, TEMPLATE_IDS, OWNER, prompt_prob=1.0)
  ids = np.asarray(ids)
  assert ids[0].tolist() == [12, 0, 0] and ids[2].tolist() == [12, 0, 0]
  assert ids[1, 0] in (21, 22) and ids[3].tolist() == [4, 4, 4]
  # Columns = texts. "the star" (cols 0, 2) is true for regions 0 and 2; region 1, 3 have no
  # category, so that pair is unknown (weight 0). The red template (col 1) is true for region 1
  # only, known for all. Region 3's caption (col 3) is positive on the diagonal only.
  expected = np.array([[1, 0, 1, 0],
                       [0, 1, 0, 0],
                       [1, 0, 1, 0],
                       [0, 0, 0, 1]], bool)
  expected_w = np.array([[1, 1, 1, 1],
                         [0, 1, 0, 1],
                         [1, 1, 1, 1],
                         [0, 1, 0, 1]], np.float32)
  np.testing.assert_array_equal(np.asarray(labels), expected)
  np.testing.assert_array_equal(np.asarray(weights), expected_w)


def test_prompt_prob_zero_keeps_the_captions_and_the_diagonal():
  text_ids = np.arange(12, dtype=np.int32).reshape(4, 3)
  ids, labels, weights = sample_rtc_texts(
      jax.random.key(0), text_ids, np.array([0, 1, 0, 1], np.int32), np.ones((4, 2), np.int32),
      CLASS_IDS, TEMPLATE_IDS, OWNER, prompt_prob=0.0)
  np.testing.assert_array_equal(np.asarray(ids), text_ids)
  np.testing.assert_array_equal(np.asarray(labels), np.eye(4, dtype=bool))
  np.testing.assert_array_equal(np.asarray(weights), np.ones((4, 4)))


def test_prompts_are_drawn_uniformly_among_the_true_ones():
  # One region, red (2 templates) and a circle: 3 true prompts, each about 1/3 of the draws.
  text_ids = np.zeros((1, L), np.int32)
  first = jax.jit(jax.vmap(lambda k: sample_rtc_texts(
      k, text_ids, np.array([0], np.int32), np.array([[1, 0]], np.int32), CLASS_IDS,
      TEMPLATE_IDS, OWNER, prompt_prob=1.0)[0][0, 0]))
  drawn = np.asarray(first(jax.random.split(jax.random.key(0), 600)))
  counts = {v: int((drawn == v).sum()) for v in (11, 21, 22)}
  assert sum(counts.values()) == 600 and all(150 < v < 250 for v in counts.values()), counts


def test_class_share_draws_the_class_prompt_that_often_else_a_template():
  # One region, red (2 templates) and a circle. class_share=0.7: "the circle" in ~70% of the
  # draws (binomial sd over 2,000 draws: about 1%), the two red templates share the rest.
  text_ids = np.zeros((1, L), np.int32)

  def draws(share, category, attributes, n=2000):
    fn = jax.jit(jax.vmap(lambda k: sample_rtc_texts(
        k, text_ids, np.array([category], np.int32), np.array([attributes], np.int32),
        CLASS_IDS, TEMPLATE_IDS, OWNER, prompt_prob=1.0, class_share=share)[0][0, 0]))
    return np.asarray(fn(jax.random.split(jax.random.key(1), n)))

  drawn = draws(0.7, 0, [1, 0])
  assert 0.66 < np.mean(drawn == 11) < 0.74
  assert 0.12 < np.mean(drawn == 21) < 0.18 and 0.12 < np.mean(drawn == 22) < 0.18
  assert set(np.unique(drawn)) == {11, 21, 22}
  # A region with only one kind of true prompt takes that kind whatever the share.
  assert set(np.unique(draws(0.0, 1, [0, 0], 200))) == {12}      # a star, no attribute
  assert set(np.unique(draws(1.0, -1, [0, 1], 200))) == {23}     # no category, blue
  assert set(np.unique(draws(1.0, 0, [1, 0], 200))) == {11}
  assert set(np.unique(draws(0.0, 0, [1, 0], 200))) == {21, 22}
