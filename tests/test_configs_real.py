"""The full-size real-data configs: the published recipe (SPEC §9/§14), their data sections, and
the one-line error for a required path left empty. (Their smoke mode is trained by
tests/test_config_lib.py::test_every_config_runs_two_steps_in_smoke_mode.)"""

import os

import pytest

from configs import common
from dynrefer_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, *overrides):
  return config_lib.load(os.path.join(ROOT, "configs", name), list(overrides))


@pytest.mark.parametrize("name,epochs,tag_thr,splits,published", [
    ("dynrefer_vg.py", 5, 0.7, ["vg_dense", "vg_reg", "ovad", "coco"],
     {"vg_dense": "vg_dense", "vg_reg": "vg_reg", "ovad": "ovad", "coco": "coco"}),
    ("dynrefer_refcocog.py", 3, 0.76, ["refcocog"], "refcocog")])
def test_published_recipe(name, epochs, tag_thr, splits, published):
  c = _load(name)
  o = c.optim
  assert (o.lr, o.min_lr, o.weight_decay, o.b1, o.b2) == (1e-4, 0.0, 0.05, 0.9, 0.999)
  assert o.schedule == "per_epoch" and o.epochs == epochs and o.warmup_steps == 0
  assert o.grad_clip_norm == 0.0
  assert list(c.trainable) == list(common.ORIGINAL_TRAINABLE)
  assert c.train.batch_size == 512 and c.train.steps == 0     # steps from the epochs
  m = c.model
  assert m.vit.depth == 39 and m.lm.d_model == 2048 and m.num_views == 3
  assert m.tag_threshold == tag_thr and m.loss.rtc_prompt_prob == 0.0
  assert c.data.text_tokenizer == "clip" and c.data.text_len == m.text.context_length == 77
  assert c.data.name != "synthetic" and c.data.dir == "" and c.model_init == ""
  assert list(c.eval.splits) == splits and set(splits) <= set(c.data.splits)
  assert (c.eval.published.to_dict() if hasattr(c.eval.published, "to_dict")
          else c.eval.published) == published
  # each split scored by its paper task (SPEC §14)
  tasks = {"vg_dense": ["dense_caption"], "vg_reg": ["region_caption"], "ovad": ["attributes"],
           "coco": ["recognition"], "refcocog": ["region_caption"]}
  assert c.eval.tasks.to_dict() == {s: tasks[s] for s in splits}


def test_paths_are_overridable_flags():
  c = _load("dynrefer_vg.py", "data.dir=/data", "model_init=/ckpts/vg1.2_jax",
            "data.tokenizer_dir=/m/flan-t5-xl", "data.tag_list=/m/ram_tag_list.txt",
            "data.ovad_annotations=/m/ovad2000.json", "data.class_names=/m/coco.json",
            "data.splits.coco=coco2017/val")
  assert c.data.dir == "/data" and c.data.splits.coco == "coco2017/val"
  assert c.model_init == "/ckpts/vg1.2_jax"


@pytest.mark.parametrize("name", ["dynrefer_vg.py", "dynrefer_refcocog.py"])
def test_smoke_is_toy_size_with_no_user_files(name):
  c = _load(name + ":smoke")
  assert c.train.steps == 2 and c.data.fixture and c.data.dir == "" and c.model_init == ""
  assert c.model.vit.depth == 2 and c.model.text.eot_token_id is None
  assert c.data.text_len <= c.model.text.context_length


def test_empty_data_dir_is_one_line_naming_the_flag(tmp_path, capsys):
  from dynrefer_jax import train  # pylint: disable=import-outside-toplevel
  rc = train.main(["--config", os.path.join(ROOT, "configs", "dynrefer_refcocog.py"),
                   "--workdir", str(tmp_path)])
  err = capsys.readouterr().err.strip()
  assert rc == 1 and "\n" not in err and "--config.data.dir=" in err
