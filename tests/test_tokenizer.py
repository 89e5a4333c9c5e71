"""Tests for clipcrop_jax.owlvit.tokenizer (CLIP BPE ids, cleaning, truncation, errors)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from clipcrop_jax.owlvit import tokenizer

SOT = tokenizer.SOT_TOKEN
EOT = tokenizer.EOT_TOKEN

# 19 BPE tokens: every word below is a single token.
LONG_BASE = "a photo of a cat and a dog and a bird and a fish and a cow and a"


@pytest.fixture(name="reset_warning_flag")
def fixture_reset_warning_flag(monkeypatch):
  monkeypatch.setattr(tokenizer, "_truncation_warned", False)


def test_constants():
  assert (tokenizer.SOT_TOKEN, tokenizer.EOT_TOKEN, tokenizer.PAD_TOKEN) == (49406, 49407, 0)


def test_known_ids():
  ids = tokenizer.tokenize("a photo of a cat")
  assert ids.dtype == np.int32
  assert ids.shape == (1, 16)
  np.testing.assert_array_equal(ids[0], [49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 9)


def test_batch_and_max_len():
  ids = tokenizer.tokenize(["a photo of a cat", "dog"], max_len=8)
  assert ids.shape == (2, 8)
  np.testing.assert_array_equal(ids[1, :3], [SOT, tokenizer.encode("dog")[0], EOT])
  assert (ids[1, 3:] == 0).all()
  assert tokenizer.tokenize([]).shape == (0, 16)


def test_tuple_and_numpy_strings():
  ref = tokenizer.tokenize(["a cat", "a dog"])
  np.testing.assert_array_equal(tokenizer.tokenize(("a cat", "a dog")), ref)
  np.testing.assert_array_equal(tokenizer.tokenize(np.array(["a cat", "a dog"])), ref)


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("&amp; html &lt;b&gt;", "& html <b>"),
        ("\ufb01 ligature", "fi ligature"),  # U+FB01 LATIN SMALL LIGATURE FI.
        ("&amp;amp; twice", "& twice"),  # HTML unescaped twice.
        ("  A\tPhoto \n\n of  a CAT  ", "a photo of a cat"),
    ],
)
def test_cleaning(raw, clean):
  np.testing.assert_array_equal(tokenizer.tokenize(raw), tokenizer.tokenize(clean))


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("&amp; html &lt;b&gt;", "& html <b>"),
        ("\ufb01 ligature", "fi ligature"),
    ],
)
def test_cleaning_is_needed(raw, clean):
  """The BPE backend alone (no ftfy / HTML cleaning) gives different ids for these pairs."""
  bpe = tokenizer._bpe()  # pylint: disable=protected-access
  assert list(bpe.encode(raw)) != list(bpe.encode(clean))


def test_clean_text_lowercases():
  assert tokenizer.clean_text("  \u00c9COLE\u00a0 Caf\u00e9 ") == "\u00e9cole caf\u00e9"
  np.testing.assert_array_equal(tokenizer.tokenize("\u00c9COLE"), tokenizer.tokenize("\u00e9cole"))


def test_exact_fit_is_not_truncated(reset_warning_flag):
  del reset_warning_flag
  text = " ".join(LONG_BASE.split()[:14])
  assert len(tokenizer.encode(text)) == 14
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ids = tokenizer.tokenize(text)
  assert ids[0, -1] == EOT
  assert ids[0, 0] == SOT
  assert (ids[0] == EOT).sum() == 1


def test_truncation_keep_eot(reset_warning_flag):
  del reset_warning_flag
  full = [SOT] + tokenizer.encode(LONG_BASE) + [EOT]
  assert len(full) == 21
  with pytest.warns(UserWarning, match="truncated to max_len=16"):
    ids = tokenizer.tokenize(LONG_BASE)
  np.testing.assert_array_equal(ids[0, :15], full[:15])
  assert ids[0, 15] == EOT
  # The text encoder pools at argmax(ids): the EOT position, not SOT.
  assert int(np.argmax(ids[0])) == 15


def test_truncation_keep_eot_long_queries_differ(reset_warning_flag):
  """Over-long queries differing inside the kept prefix stay different and pool at EOT."""
  del reset_warning_flag
  queries = ["a red " + LONG_BASE, "a blue " + LONG_BASE]
  with pytest.warns(UserWarning):
    keep = tokenizer.tokenize(queries)
  assert not np.array_equal(keep[0], keep[1])
  np.testing.assert_array_equal(keep[:, 15], [EOT, EOT])
  np.testing.assert_array_equal(np.argmax(keep, axis=-1), [15, 15])
  # Scenic truncation: no EOT, argmax pooling picks SOT (position 0) for both queries.
  scenic = tokenizer.tokenize(queries, truncation="scenic")
  assert not (scenic == EOT).any()
  np.testing.assert_array_equal(np.argmax(scenic, axis=-1), [0, 0])


def test_truncation_keep_eot_common_prefix_limit(reset_warning_flag):
  """Documented limit: queries sharing SOT + 14 BPE tokens become identical rows."""
  del reset_warning_flag
  with pytest.warns(UserWarning):
    ids = tokenizer.tokenize([LONG_BASE + " horse", LONG_BASE + " sheep"])
  np.testing.assert_array_equal(ids[0], ids[1])


def test_truncation_scenic(reset_warning_flag):
  del reset_warning_flag
  full = [SOT] + tokenizer.encode(LONG_BASE) + [EOT]
  with pytest.warns(UserWarning, match="EOT was dropped"):
    ids = tokenizer.tokenize(LONG_BASE, truncation="scenic")
  np.testing.assert_array_equal(ids[0], full[:16])
  assert EOT not in ids[0]


def test_warning_once_per_process(reset_warning_flag):
  del reset_warning_flag
  with pytest.warns(UserWarning, match="text query 1 .*truncated") as record:
    tokenizer.tokenize(["cat", LONG_BASE, LONG_BASE + " dog"])
  assert len([w for w in record if "truncated" in str(w.message)]) == 1
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tokenizer.tokenize(LONG_BASE)  # Already warned in this "process".


def test_unknown_truncation():
  with pytest.raises(ValueError, match="truncation"):
    tokenizer.tokenize("a cat", truncation="left")


@pytest.mark.parametrize(
    "texts, index",
    [
        ("", 0),
        (["a cat", "dog", "   "], 2),
        (["a cat", "\t\n"], 1),
        (["&nbsp;"], 0),  # Becomes U+00A0, stripped as whitespace.
    ],
)
def test_empty_query(texts, index):
  with pytest.raises(ValueError, match=f"text query {index} is empty"):
    tokenizer.tokenize(texts)


def test_non_str_query():
  with pytest.raises(TypeError, match="text query 1"):
    tokenizer.tokenize(["a cat", 3])
  with pytest.raises(TypeError, match="text query 0"):
    tokenizer.tokenize([None])
  with pytest.raises(TypeError, match="bytes"):
    tokenizer.tokenize(b"a cat")


@pytest.mark.parametrize("max_len", [0, 1, 2.5, True])
def test_bad_max_len(max_len):
  with pytest.raises(ValueError, match="max_len"):
    tokenizer.tokenize("a cat", max_len=max_len)


def _hf_clip_tokenizer():
  """Builds transformers' CLIPTokenizer from the merges embedded in instant_clip_tokenizer."""
  transformers = pytest.importorskip("transformers")
  import instant_clip_tokenizer  # pylint: disable=g-import-not-at-top

  pkg_dir = os.path.dirname(instant_clip_tokenizer.__file__)
  blob = b""
  for fname in os.listdir(pkg_dir):
    if fname.endswith((".so", ".pyd")):
      with open(os.path.join(pkg_dir, fname), "rb") as f:
        blob = f.read()
  start = blob.find(b"#version: 0.2\n")
  if start < 0:
    pytest.skip("merges not found inside instant_clip_tokenizer binary")
  lines = blob[start:].split(b"\n", 48896)[1:48895]
  merges = [tuple(line.decode("utf-8").split(" ")) for line in lines]
  # GPT-2 byte -> unicode symbol table (printable bytes map to themselves).
  byte_ids = (
      list(range(ord("!"), ord("~") + 1))
      + list(range(ord("\u00a1"), ord("\u00ac") + 1))
      + list(range(ord("\u00ae"), ord("\u00ff") + 1))
  )
  chars = byte_ids[:]
  extra = 0
  for b in range(256):
    if b not in byte_ids:
      byte_ids.append(b)
      chars.append(256 + extra)
      extra += 1
  symbols = [chr(c) for c in chars]
  vocab_list = (
      symbols
      + [s + "</w>" for s in symbols]
      + ["".join(m) for m in merges]
      + ["<|startoftext|>", "<|endoftext|>"]
  )
  assert len(vocab_list) == 49408
  vocab = {tok: i for i, tok in enumerate(vocab_list)}
  return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


def test_matches_hf_clip_tokenizer():
  """Optional oracle: HF CLIPTokenizer built offline from the same vocabulary.

  HF's cleaner is NFC + whitespace + lowercase (no ftfy / HTML), so only inputs on which both
  cleaners agree are compared. (HF also lowercases a final capital sigma differently from Python.)
  """
  hf = _hf_clip_tokenizer()
  texts = [
      "a photo of a cat",
      "Don't PANIC!! 123 emigre na\u00efve caf\u00e9",
      "x!y",
      "\u6771\u4eac\u30bf\u30ef\u30fc \U0001f642",
      "rocket  ship\twith NASA badge",
      "star-spangled banner",
      "it's 3.14 o'clock",
      "\u0130stanbul",
  ]
  for text in texts:
    expected = hf(text)["input_ids"]
    assert [SOT] + tokenizer.encode(text) + [EOT] == expected, text
