"""Rule-based tag parser: hand-written expected tag sets (SPEC §7a), vocabulary file reading."""

import pytest

from dynrefer_jax.data import synthetic, tags

VOCAB = """man
woman
person
child
boy
girl
shirt
white shirt
T-shirt
white
black
red
blue
green
yellow
wooden
large
two
dog
grass
sky
blue sky
kite
cloud
table
wooden table
glass
water
plate
food
bus
red bus
building
white building
tree
green tree
fence
banana
apple
bowl
cup
laptop
cat
horse
hat
skier
jersey
number
sidewalk
street
car
French fries
baseball glove
baseball
player
baseball player
sign
stop sign
traffic light
light
pole
umbrella
beach
helmet
bike
wave
ocean
on
wearing
left of
in front of""".strip()

# caption -> (tag_set1, tag_set2), written by hand from the rules in tags.py's docstring.
CASES = [
    ("a man wearing a white shirt", {"man"}, {"wearing", "shirt", "white shirt", "white"}),
    ("Man wearing a blue T-shirt.", {"man"}, {"wearing", "blue", "T-shirt"}),
    ("two dogs sitting on the grass", {"dog", "two"}, {"grass"}),
    ("the sky is blue", {"sky", "blue"}, set()),
    ("man in front of a red bus", {"man"}, {"in front of", "bus", "red bus", "red"}),
    ("Kites flying in the sky.", {"kite"}, {"sky"}),
    ("a woman and a child", {"woman", "child"}, set()),
    ("the cat is on the table", {"cat"}, {"on", "table"}),
    ("a plate with food on it", {"plate"}, {"food", "on"}),
    ("glass of water on a wooden table", {"glass"},
     {"water", "on", "table", "wooden table", "wooden"}),
    ("the man is a skier", {"man", "skier"}, set()),
    ("a large white building", {"building", "white building", "large", "white"}, set()),
    ("people walking on the sidewalk", {"person"}, {"sidewalk"}),
    ("bananas and apples in a bowl", {"banana", "apple"}, {"bowl"}),
    ("tall green trees behind the fence", {"tree", "green tree", "green"}, {"fence"}),
    ("the number 4 on a jersey", {"number"}, {"on", "jersey"}),
    ("a Red Kite in the sky", {"kite", "red"}, {"sky"}),
    ("white clouds in blue sky", {"cloud", "white"}, {"sky", "blue sky", "blue"}),
    ("cup to the left of the laptop", {"cup"}, {"left of", "laptop"}),
    ("a bowl of French fries", {"bowl"}, {"French fries"}),
    ("baseball player wearing a baseball glove", {"player", "baseball player", "baseball"},
     {"wearing", "baseball glove", "baseball"}),
    ("red stop sign on a pole", {"sign", "stop sign", "red"}, {"on", "pole"}),
    ("the traffic light is green", {"traffic light", "light", "green"}, set()),
    ("a boy riding a bike", {"boy"}, {"bike"}),
    ("girl holding a yellow umbrella on the beach", {"girl"},
     {"yellow", "umbrella", "on", "beach"}),
    ("a man's black hat", {"hat", "man", "black"}, set()),
    ("waves in the ocean", {"wave"}, {"ocean"}),
    ("cars parked on the street", {"car"}, {"street"}),
    ("a skier wearing a helmet", {"skier"}, {"wearing", "helmet"}),
    ("horse next to a fence", {"horse"}, {"fence"}),
    ("the dogs", {"dog"}, set()),
    ("...", set(), set()),
    ("children and men", {"child", "man"}, set()),
    ("the small striped red star left of the blue ring", {"red"}, {"left of", "blue"}),
]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("v") / "tags.txt"
  path.write_text(VOCAB)  # no trailing newline, like the RAM list
  return str(path)


def test_load_vocabulary_line_indices(vocab_file, tmp_path):
  vocab = tags.load_vocabulary(vocab_file)
  assert len(vocab) == VOCAB.count("\n") + 1
  assert vocab[0] == "man" and vocab[-1] == "in front of" and vocab[51] == "French fries"
  with_newline = tmp_path / "t2.txt"
  with_newline.write_text("a\nb c\nZoo\n")
  assert tags.load_vocabulary(str(with_newline)) == ["a", "b c", "Zoo"]


@pytest.mark.parametrize("caption,want1,want2", CASES)
def test_hand_written_tag_sets(vocab_file, caption, want1, want2):
  parser = tags.TagParser(tags.load_vocabulary(vocab_file))
  set1, set2 = parser.tag_sets(caption)
  assert (set(set1), set(set2)) == (want1, want2)
  assert len(set1) == len(set(set1)) and len(set2) == len(set(set2))


def test_tag_ids_are_line_numbers(vocab_file):
  parser = tags.TagParser(tags.load_vocabulary(vocab_file))
  ids1, ids2 = parser.tag_ids("a man wearing a white shirt")
  assert ids1 == [0] and sorted(ids2) == [6, 7, 9, 68]  # shirt, white shirt, white, wearing


def test_lemmatize():
  pairs = {"dogs": "dog", "buses": "bus", "boxes": "box", "benches": "bench",
           "puppies": "puppy", "women": "woman", "glass": "glass", "leaves": "leaf",
           "tomatoes": "tomato", "bus": "bus", "cat": "cat", "dresses": "dress"}
  for word, lemma in pairs.items():
    assert tags.lemmatize(word) == lemma, word


def test_reproduces_the_synthetic_tag_sets():
  # The synthetic world states its tag sets from the scene; the parser must recover them from
  # the caption alone.
  parser = tags.TagParser(synthetic.tag_vocabulary())
  scenes = [synthetic.render_image(5, "train", i, 96)[1] for i in range(12)]
  checked = 0
  for objects in scenes:
    for obj in objects:
      caption, set1, set2 = synthetic.describe(obj, objects)
      got1, got2 = parser.tag_sets(caption)
      assert (set(got1), set(got2)) == (set(set1), set(set2)), caption
      checked += 1
  assert checked > 40
