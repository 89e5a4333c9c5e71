"""Why the crop service refuses a request, as types, and the one table of their HTTP statuses.

The service core (`serving.service`) raises these (and the image errors of
`owlvit.preprocessing`); the HTTP layer answers with `status_of(error)` and `message_of(error)`.
Refusals decided by the HTTP layer itself (token, content type, body size) are not listed here.
"""

from __future__ import annotations

from typing import Optional

from clipcrop_jax.owlvit import preprocessing as pp


class ServiceError(Exception):
  """A refused request: a one-line `message` and extra response `headers`."""

  def __init__(self, message: str, headers: Optional[dict[str, str]] = None):
    super().__init__(message)
    self.message = ' '.join(str(message).split())
    self.headers = headers or {}


class Busy(ServiceError):
  """`max_queue` requests are already in the service (with a Retry-After header)."""


class TextTooLong(ServiceError):
  """`text` is longer than `max_text_chars`."""


class InvalidRequest(ServiceError):
  """A bad or missing field (the API's ValueError / TypeError, or the service's own checks)."""


class TimedOut(ServiceError):
  """No answer within `timeout_s`."""


# Error type -> HTTP status; the first matching row wins (subclasses before their bases).
STATUS: tuple[tuple[type[Exception], int], ...] = (
    (pp.ImageTooLargeError, 413),  # decoded pixels above `max_pixels`
    (pp.NotAnImageError, 415),  # the upload is no image
    (pp.ImageError, 400),  # empty, truncated, corrupt
    (Busy, 503),
    (TextTooLong, 413),
    (InvalidRequest, 422),
    (TimedOut, 504),
)


def status_of(error: Exception) -> int:
  """The HTTP status of a refusal (`STATUS`); 500 for any other error."""
  for kind, status in STATUS:
    if isinstance(error, kind):
      return status
  return 500


def message_of(error: Exception) -> str:
  """The one-line message of a refusal (a pixel-limit error without the API's way round it)."""
  if isinstance(error, pp.ImageTooLargeError):
    return error.summary
  return ' '.join(str(error).split())


def headers_of(error: Exception) -> dict[str, str]:
  return dict(getattr(error, 'headers', None) or {})
