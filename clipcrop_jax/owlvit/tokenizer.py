"""CLIP BPE tokenizer for OWL-ViT text queries.

Token ids are identical to OpenAI CLIP's `SimpleTokenizer` (used by Scenic's `clip/tokenizer.py`):
`[SOT] + BPE(clean(text)) + [EOT]`, right-padded with zeros to `max_len` (16 for OWL-ViT).

The byte-pair encoding itself is delegated to the PyPI package `instant-clip-tokenizer`, which
embeds the same `bpe_simple_vocab_16e6.txt.gz` vocabulary/merges as OpenAI CLIP. That package
lowercases but does no other text cleaning, so the cleaning of `SimpleTokenizer` (ftfy, double HTML
unescape, whitespace collapsing, lowercasing) is applied here before the text is handed to it.

Truncation of over-long queries is done here as well, so the policy is explicit:

* `"keep_eot"` (default): keep the first `max_len - 1` tokens and put EOT last. The text encoder
  pools at the EOT position (argmax of the ids), so long queries that differ within their first
  `max_len - 2` BPE tokens still get distinct embeddings. This matches what Hugging Face's
  `CLIPTokenizer` does when truncating.
* `"scenic"`: keep exactly the first `max_len` tokens, as Scenic does. EOT is then lost, argmax
  pooling picks SOT at position 0 and every over-long query maps to the same, text-independent
  embedding.
"""

from __future__ import annotations

import functools
import html
import re
from typing import Sequence
import warnings

import ftfy
from instant_clip_tokenizer import Tokenizer
import numpy as np

from clipcrop_jax.owlvit.configs import MAX_QUERY_LENGTH

SOT_TOKEN = 49406  # `<|startoftext|>`
EOT_TOKEN = 49407  # `<|endoftext|>`
PAD_TOKEN = 0  # Byte symbol "!"; doubles as padding as in Scenic.
DEFAULT_MAX_LEN = MAX_QUERY_LENGTH  # OWL-ViT text positional embedding length (16).

TRUNCATION_MODES = ("keep_eot", "scenic")

_WHITESPACE_RE = re.compile(r"\s+")

# Set once the first truncation warning has been emitted (one warning per process).
_truncation_warned = False


@functools.lru_cache(maxsize=1)
def _bpe() -> Tokenizer:
  """Returns the shared `instant_clip_tokenizer.Tokenizer` (construction is expensive)."""
  return Tokenizer()


def clean_text(text: str) -> str:
  """Cleans a query exactly like OpenAI CLIP's `SimpleTokenizer.encode` does before BPE.

  Steps: `ftfy.fix_text`, `html.unescape` twice, strip, collapse every whitespace run to a single
  space, strip, lowercase.

  Args:
    text: raw query string.

  Returns:
    The cleaned, lowercased string (possibly empty).
  """
  text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text))
  text = text.strip()
  text = _WHITESPACE_RE.sub(" ", text).strip()
  return text.lower()


def encode(text: str) -> list[int]:
  """Returns the BPE token ids of one query, without SOT/EOT and without truncation.

  Args:
    text: raw query string; it is cleaned with `clean_text` first.

  Returns:
    List of int token ids in [0, 49405]; empty if the cleaned text is empty.
  """
  cleaned = clean_text(text)
  if not cleaned:
    return []
  return [int(t) for t in _bpe().encode(cleaned)]


def _warn_truncated(index: int, num_tokens: int, max_len: int, truncation: str) -> None:
  """Emits the truncation warning the first time a query is truncated in this process."""
  global _truncation_warned
  if _truncation_warned:
    return
  _truncation_warned = True
  if truncation == "keep_eot":
    consequence = "the last BPE tokens were dropped and EOT kept at the end"
  else:
    consequence = (
        "EOT was dropped, so the text encoder pools the SOT token and the query "
        "embedding no longer depends on the text (Scenic behaviour)"
    )
  warnings.warn(
      f"text query {index} has {num_tokens} tokens including SOT/EOT and was truncated to "
      f"max_len={max_len} tokens ({truncation!r}: {consequence}). This warning is shown once "
      "per process.",
      UserWarning,
      stacklevel=3,
  )


def tokenize(
    texts: str | Sequence[str], max_len: int = DEFAULT_MAX_LEN, truncation: str = "keep_eot"
) -> np.ndarray:
  """Tokenizes text queries into fixed-length CLIP token id rows.

  Each row is `[SOT] + BPE(clean_text(text)) + [EOT]` followed by `PAD_TOKEN` (0) up to `max_len`.

  Args:
    texts: one query string or a sequence of N query strings.
    max_len: row length L (16 for all OWL-ViT checkpoints); at least 2.
    truncation: policy when `len(BPE) + 2 > max_len`:
      `"keep_eot"`: first `max_len - 1` tokens (SOT + BPE prefix), then EOT; or
      `"scenic"`: exactly the first `max_len` tokens (SOT + BPE prefix, no EOT), as Scenic does.
      Either way a `UserWarning` is emitted the first time a query is truncated in this process.

  Returns:
    int32 array of shape (N, max_len); N = 1 for a single string and 0 for an empty sequence.

  Raises:
    ValueError: unknown `truncation`, `max_len` < 2, or a query that is empty after cleaning
      (message names the query index, e.g. "text query 2 is empty").
    TypeError: `texts` (or one of its items, named by index) is not a string.
  """
  if truncation not in TRUNCATION_MODES:
    raise ValueError(
        f"unknown truncation {truncation!r}; expected one of {', '.join(TRUNCATION_MODES)}"
    )
  if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 2:
    raise ValueError(f"max_len must be an integer >= 2 (room for SOT and EOT), got {max_len!r}")
  max_len = int(max_len)
  if isinstance(texts, str):
    texts = [texts]
  elif isinstance(texts, (bytes, bytearray)):
    raise TypeError("texts must be a str or a sequence of str, got bytes; decode it first")

  rows = []
  for index, text in enumerate(texts):
    if not isinstance(text, str):
      raise TypeError(f"text query {index} is not a str (got {type(text).__name__})")
    ids = encode(text)
    if not ids:
      raise ValueError(f"text query {index} is empty (after whitespace/HTML cleaning): {text!r}")
    tokens = [SOT_TOKEN, *ids, EOT_TOKEN]
    if len(tokens) > max_len:
      _warn_truncated(index, len(tokens), max_len, truncation)
      if truncation == "keep_eot":
        tokens = tokens[: max_len - 1] + [EOT_TOKEN]
      else:
        tokens = tokens[:max_len]
    rows.append(tokens)

  out = np.full((len(rows), max_len), PAD_TOKEN, dtype=np.int32)
  for i, tokens in enumerate(rows):
    out[i, : len(tokens)] = tokens
  return out
