"""Weights by name: Hugging Face model ids and Scenic's released checkpoints, as local files.

  from clipcrop_jax.owlvit import hub
  hub.locate('google/owlv2-base-patch16-ensemble')  # -> (HF snapshot dir, None)
  hub.locate('hf:google/owlvit-base-patch32@main')  # explicit prefix and a revision
  hub.locate('clip_vit_b32_b0203fc')     # -> (~/.cache/clipcrop_jax/scenic/<name>, 'clip_b32')
  hub.locate('scenic:some_other_file')              # any file under the Scenic base URL

`owlvit.load_checkpoint`, `ClipCropper.load`, both CLIs' `--checkpoint` and the training configs'
`init_from.owlvit` all go through `locate`. Rules, in order:

1. An existing file or directory is always a path (a name never shadows a file).
2. `hf:ORG/NAME[@REV]` or `ORG/NAME[@REV]` is a Hugging Face model id (REV: a branch, tag or
   commit). Bare `ORG/NAME` ending in a checkpoint suffix (`.msgpack`, `.safetensors`, ...) is a
   missing path, not an id.
3. `scenic:NAME`, or a NAME of `SCENIC_RELEASES` (Scenic's README table; extend it with
   `register_scenic_release`), is a Scenic release file.

Hugging Face (`huggingface_hub`, the optional extra `hub`): files come from / go to the HF cache
(`HF_HUB_CACHE`, else `HF_HOME/hub`, else huggingface_hub's default; read at call time).
`HF_HUB_OFFLINE=1` never touches the network. Files already in the cache are used without any
network access (a cached `main` is not refreshed: pass `@<commit>` or delete the cache entry for
a newer one). `model.safetensors` (or a sharded index) is preferred; a repository with only
`pytorch_model.bin` is read with `torch.load(weights_only=True)` (a loader that cannot run code;
needs torch) and converted once to safetensors under `CLIPCROP_CACHE/hf-safetensors/`. No general
unpickler is ever used.

Scenic: `CLIPCROP_SCENIC_URL/<name>` (default `SCENIC_BASE_URL`) is downloaded to
`CLIPCROP_CACHE/scenic/<name>` (default cache `~/.cache/clipcrop_jax`) with a progress bar, into
`<name>.part` first: an interrupted download resumes from there (HTTP Range; a few automatic
retries, then again on the next call), and only a complete file that passes the checks (size from
the server, size and SHA-256 where the table knows them, a msgpack header, no HTML page) is
renamed into place. A lock file (`.locks/<name>.lock`) serialises concurrent downloads of a name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import http.client
import json
import os
import pathlib
import re
import shutil
import types
import urllib.error
import urllib.request
from typing import Any, Iterator, Mapping, Optional, Union

from absl import logging
import tqdm

from clipcrop_jax.owlvit import checkpoint_files
from clipcrop_jax.owlvit import fileio

PathLike = Union[str, os.PathLike]

SCENIC_BASE_URL = 'https://storage.googleapis.com/scenic-bucket/owl_vit/checkpoints'
DEFAULT_CACHE = '~/.cache/clipcrop_jax'
HF_PREFIX = 'hf:'
SCENIC_PREFIX = 'scenic:'
HUB_EXTRA_HINT = "pip install 'clipcrop-jax[hub]' (or: pip install huggingface_hub)"

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0
_RETRIES = 3
_HF_CONFIG = 'config.json'
_HF_SAFETENSORS = 'model.safetensors'
_HF_INDEX = 'model.safetensors.index.json'
_HF_PICKLE = 'pytorch_model.bin'
# Optional namespace, then a name: HF's own repo-id rule (letters, digits, '-', '_', '.').
_HF_REPO = re.compile(r'(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*')
_HF_REVISION = re.compile(r'[\w.][\w./-]*')
_SCENIC_NAME = re.compile(r'[A-Za-z0-9][\w.-]*')
# A missing `dir/file.msgpack` is a mistyped path, not a Hugging Face id.
_FILE_SUFFIXES = (
    '.msgpack',
    '.safetensors',
    '.bin',
    '.pt',
    '.pth',
    '.ckpt',
    '.pkl',
    '.pickle',
    '.json',
    '.npz',
    '.npy',
    '.h5',
    '.index',
)
_NAME_HELP = (
    'a Hugging Face id such as google/owlv2-base-patch16-ensemble or hf:ID[@REV], a '
    'Scenic release such as clip_vit_b32_b0203fc, or scenic:NAME'
)


class HubError(checkpoint_files.CheckpointError):
  """A checkpoint name cannot be resolved: unknown, not downloadable, or a bad download."""


class _Interrupted(Exception):
  """A transfer stopped before the end; the `.part` file keeps what arrived (resumable)."""


# --------------------------------------------------------------------------------------------
# Scenic's released checkpoints (Scenic owl_vit README; spec §7.3).
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScenicRelease:
  """One downloadable Scenic checkpoint file.

  Attributes:
    name: file name under the Scenic base URL (also the cache file name).
    config: OWL-ViT config it must match (`configs.get_config` name); None = infer from weights.
    approx_mib: size quoted in Scenic's README, only for messages (not checked).
    size: exact size in bytes, checked when set.
    sha256: hex SHA-256 of the file, checked after a download when set.
  """

  name: str
  config: Optional[str] = None
  approx_mib: Optional[int] = None
  size: Optional[int] = None
  sha256: Optional[str] = None


SCENIC_RELEASES: dict[str, ScenicRelease] = {
    r.name: r
    for r in [
        ScenicRelease('clip_vit_b32_b0203fc', 'clip_b32', 583),
        ScenicRelease('clip_vit_b16_6171dab', 'clip_b16', 581),
        ScenicRelease('clip_vit_l14_d83d374', 'clip_l14', 1652),
        ScenicRelease('clip_vit_l14_with_masks_6c17944', 'clip_l14', 1844),  # mask head dropped
        ScenicRelease('owl2-b16-960-st-ngrams_c7e1b9a', 'owl2_b16', 590),
        ScenicRelease('owl2-b16-960-st-ngrams-ft-lvisbase_d368398', 'owl2_b16', 590),
        ScenicRelease(
            'owl2-b16-960-st-ngrams-curated-ft-lvisbase-ens-cold-weight-05_209b65b', 'owl2_b16', 590
        ),
        ScenicRelease('owl2-l14-1008-st-ngrams_0881fd6', 'owl2_l14', 1666),
        ScenicRelease('owl2-l14-1008-st-ngrams-ft-lvisbase_8ca674c', 'owl2_l14', 1666),
        ScenicRelease(
            'owl2-l14-1008-st-ngrams-ft-lvisbase-ens-cold-weight-04_8ca674c', 'owl2_l14', 1666
        ),
        ScenicRelease('owl2-b16-960-st-ngrams-ft-o365vg_925e87d', 'owl2_b16'),
        ScenicRelease('owl2-l14-1008-st-ngrams-ft-o365vg_ea5f719', 'owl2_l14'),
    ]
}


def register_scenic_release(
    name: str,
    config: Optional[str] = None,
    *,
    size: Optional[int] = None,
    sha256: Optional[str] = None,
) -> ScenicRelease:
  """Adds (or replaces) a name in `SCENIC_RELEASES`, e.g. a file only a mirror has; returns it."""
  if not _SCENIC_NAME.fullmatch(name) or '..' in name:
    raise ValueError(f'Scenic checkpoint name {name!r}: letters, digits, "-", "_", "." only')
  if sha256 is not None and not re.fullmatch(r'[0-9a-f]{64}', sha256):
    raise ValueError(f'Scenic checkpoint {name}: sha256 must be 64 lowercase hex digits')
  if size is not None and (not isinstance(size, int) or size <= 0):
    raise ValueError(f'Scenic checkpoint {name}: size must be a positive integer, got {size!r}')
  release = ScenicRelease(name, config, size=size, sha256=sha256)
  SCENIC_RELEASES[name] = release
  return release


# --------------------------------------------------------------------------------------------
# Names.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HubName:
  """A parsed checkpoint name: kind 'hf' (repo id, optional revision) or 'scenic' (file name)."""

  kind: str
  name: str
  revision: Optional[str] = None

  def __str__(self) -> str:
    return self.name + (f'@{self.revision}' if self.revision else '')


def parse_name(text: Any) -> Optional[HubName]:
  """The name `text` stands for, or None when it is no name (then it can only be a path).

  Only syntax is checked (no file system, no network); `locate` tries paths first.

  Raises:
    HubError: `text` has the `hf:` / `scenic:` prefix but a malformed rest.
  """
  if not isinstance(text, str):  # pathlib.Path and other PathLikes are always paths.
    return None
  if text.startswith(SCENIC_PREFIX):
    name = text[len(SCENIC_PREFIX) :]
    if not _SCENIC_NAME.fullmatch(name) or '..' in name:
      raise HubError(f'checkpoint {text}: not a Scenic file name (letters, digits, "-", "_", ".")')
    return HubName('scenic', name)
  if text in SCENIC_RELEASES:
    return HubName('scenic', text)
  prefixed = text.startswith(HF_PREFIX)
  repo, at, revision = text[len(HF_PREFIX) if prefixed else 0 :].partition('@')
  valid = (
      bool(_HF_REPO.fullmatch(repo))
      and '--' not in repo
      and '..' not in repo
      and not repo.endswith(('.', '-', '.git'))
      and len(repo) <= 96
      and (not at or bool(_HF_REVISION.fullmatch(revision)))
  )
  if prefixed:
    if not valid:
      raise HubError(f'checkpoint {text}: not a Hugging Face model id (ORG/NAME[@REVISION])')
    return HubName('hf', repo, revision or None)
  if valid and '/' in repo and not repo.lower().endswith(_FILE_SUFFIXES):
    return HubName('hf', repo, revision or None)
  return None


def is_name(text: Any) -> bool:
  """True when `text` is a checkpoint name `locate` can resolve (syntax only; no I/O)."""
  try:
    return parse_name(text) is not None
  except HubError:
    return False


def cache_dir() -> pathlib.Path:
  """`CLIPCROP_CACHE`, else `~/.cache/clipcrop_jax` (read at call time)."""
  return pathlib.Path(os.environ.get('CLIPCROP_CACHE') or DEFAULT_CACHE).expanduser()


def scenic_url(name: str) -> str:
  """Address of a Scenic file: `CLIPCROP_SCENIC_URL` (or `SCENIC_BASE_URL`) + '/' + name."""
  base = os.environ.get('CLIPCROP_SCENIC_URL') or SCENIC_BASE_URL
  return f'{base.rstrip("/")}/{name}'


def locate(
    checkpoint: PathLike, progress: Optional[bool] = None
) -> tuple[pathlib.Path, Optional[str]]:
  """A checkpoint path or name -> (local path, config name it must match or None).

  Args:
    checkpoint: an existing path (returned as is), or a name (module docstring); a
      `pathlib.Path` is always a path.
    progress: download progress bar: None = only on a terminal, True / False = always / never.

  Returns:
    The local file or directory `checkpoints.read_checkpoint_params` reads, and the OWL-ViT
    config name of a known Scenic release (None otherwise).

  Raises:
    HubError: neither an existing path nor a resolvable name, or a failed download.
  """
  text = os.fspath(checkpoint)
  path = pathlib.Path(text).expanduser()
  if not isinstance(checkpoint, str) or path.exists():
    return path, None
  name = parse_name(checkpoint)
  if name is None:
    raise HubError(
        f'checkpoint {checkpoint}: no such file or directory, and not a checkpoint '
        f'name ({_NAME_HELP})'
    )
  if name.kind == 'scenic':
    release = SCENIC_RELEASES.get(name.name) or ScenicRelease(name.name)
    return fetch_scenic(release, progress), release.config
  could_be_path = not checkpoint.startswith(HF_PREFIX)
  return fetch_hf(name.name, name.revision, could_be_path=could_be_path), None


# --------------------------------------------------------------------------------------------
# Scenic downloads.
# --------------------------------------------------------------------------------------------


def fetch_scenic(release: ScenicRelease, progress: Optional[bool] = None) -> pathlib.Path:
  """The cached file of a Scenic release, downloaded first when missing."""
  dest = cache_dir() / 'scenic' / release.name
  if not dest.is_file():
    url = scenic_url(release.name)
    size = f', ~{release.approx_mib} MiB' if release.approx_mib else ''
    logging.info('Downloading Scenic checkpoint %s from %s to %s%s', release.name, url, dest, size)
    try:
      download(url, dest, size=release.size, sha256=release.sha256, progress=progress)
    except HubError as e:
      raise HubError(f'Scenic checkpoint {release.name}: {e}') from None
  elif release.size is not None and dest.stat().st_size != release.size:
    raise HubError(
        f'Scenic checkpoint {release.name}: cached file {dest} has '
        f'{dest.stat().st_size} bytes, expected {release.size}; delete it to download '
        'again'
    )
  return dest


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
  """An exclusive advisory lock on `path` (created if missing; kept) for the block."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'a+b') as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def download(
    url: str,
    dest: PathLike,
    *,
    size: Optional[int] = None,
    sha256: Optional[str] = None,
    progress: Optional[bool] = None,
    retries: int = _RETRIES,
    timeout: float = _TIMEOUT_S,
) -> pathlib.Path:
  """Downloads `url` to `dest`: resumable, checked, and atomic.

  Bytes go to `<dest>.part` (appended to with an HTTP Range request when it exists); a transfer
  cut short is resumed up to `retries` times, and otherwise on the next call. Only a complete
  file (server's length, and `size` / `sha256` when given) with a msgpack header is renamed to
  `dest`. An existing `dest` is returned untouched.

  Raises:
    HubError: one line naming the URL: HTTP error (e.g. 404), an HTML page instead of a
      checkpoint, no connection, a failed check (the `.part` file is then deleted), or an
      interruption after all retries (the `.part` file is kept for a resume).
  """
  dest = pathlib.Path(dest)
  dest.parent.mkdir(parents=True, exist_ok=True)
  part = dest.with_name(dest.name + '.part')
  with _locked(dest.parent / '.locks' / f'{dest.name}.lock'):
    if dest.is_file():  # another process finished it while we waited for the lock
      return dest
    for attempt in range(retries + 1):
      try:
        _transfer(url, part, progress, timeout)
        break
      except HubError:
        if part.exists() and not part.stat().st_size:
          part.unlink()  # nothing to resume
        raise
      except _Interrupted as e:
        done = part.stat().st_size if part.exists() else 0
        if attempt == retries:
          raise HubError(
              f'{url}: download interrupted after {done} bytes ({e}); run again to '
              f'resume from {part}'
          ) from None
        logging.warning('%s: download interrupted after %d bytes (%s); resuming', url, done, e)
    try:
      _check_download(part, url, size, sha256)
    except HubError:
      part.unlink(missing_ok=True)
      raise
    os.replace(part, dest)
  return dest


def _content_range(value: Optional[str]) -> tuple[Optional[int], Optional[int]]:
  """'bytes START-END/TOTAL' or 'bytes */TOTAL' -> (START or None, TOTAL or None)."""
  m = re.fullmatch(r'\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*', value or '')
  if not m:
    return None, None
  start = int(m.group(1)) if m.group(1) is not None else None
  return start, (int(m.group(2)) if m.group(2) != '*' else None)


def _looks_like_html(head: bytes) -> bool:
  return head.lstrip()[:1] == b'<'


def _html_error(url: str) -> HubError:
  return HubError(
      f'{url}: the server sent an HTML page, not a checkpoint (an error, login or '
      'proxy page; check the URL / CLIPCROP_SCENIC_URL)'
  )


def _transfer(url: str, part: pathlib.Path, progress: Optional[bool], timeout: float) -> None:
  """One HTTP request that appends to (or restarts) `part` until the server's end of file.

  Raises:
    _Interrupted: the connection broke or closed early (retryable).
    HubError: anything a retry cannot fix.
  """
  offset = part.stat().st_size if part.exists() else 0
  headers = {'User-Agent': 'clipcrop-jax', 'Accept-Encoding': 'identity'}
  if offset:
    headers['Range'] = f'bytes={offset}-'
  try:
    response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
  except urllib.error.HTTPError as e:
    e.close()
    if e.code == 416 and offset:  # Range past the end: complete already, or a different file.
      if _content_range(e.headers.get('Content-Range'))[1] == offset:
        return
      part.unlink()
      raise _Interrupted('the server has a shorter file than the partial download; restarting')
    reason = 'not found' if e.code == 404 else (e.reason or 'error')
    raise HubError(f'{url}: HTTP {e.code} ({reason})') from None
  except (urllib.error.URLError, OSError) as e:
    reason = getattr(e, 'reason', None) or e
    raise HubError(f'{url}: cannot connect ({reason})') from None
  with response:
    if 'text/html' in response.headers.get('Content-Type', '').lower():
      raise _html_error(url)
    if response.status == 206:
      start, total = _content_range(response.headers.get('Content-Range'))
      if start != offset:
        part.unlink()
        raise _Interrupted(f'the server resumed at byte {start}, not {offset}; restarting')
    else:  # 200: the whole file (a server without Range support starts over).
      offset, length = 0, response.headers.get('Content-Length')
      total = int(length) if length and length.isdigit() else None
    _append(response, part, offset, total, url, progress)
  done = part.stat().st_size
  if total is not None and done < total:
    raise _Interrupted(f'connection closed at {done} of {total} bytes')
  if total is not None and done > total:
    part.unlink()
    raise HubError(f'{url}: received {done} bytes, more than the {total} announced')


def _append(
    response: Any,
    part: pathlib.Path,
    offset: int,
    total: Optional[int],
    url: str,
    progress: Optional[bool],
) -> None:
  """Copies the response body to `part` from `offset` (fsynced), with a progress bar."""
  disable = None if progress is None else not progress
  with (
      open(part, 'ab' if offset else 'wb') as f,
      tqdm.tqdm(
          total=total,
          initial=offset,
          unit='B',
          unit_scale=True,
          unit_divisor=1024,
          desc=part.name[: -len('.part')],
          disable=disable,
          leave=False,
      ) as bar,
  ):
    try:
      while chunk := response.read(_CHUNK):
        if f.tell() == 0 and _looks_like_html(chunk):
          raise _html_error(url)
        f.write(chunk)
        bar.update(len(chunk))
    except (http.client.HTTPException, OSError) as e:  # IncompleteRead, reset, timeout
      raise _Interrupted(f'{type(e).__name__}: {e}') from None
    finally:
      f.flush()
      os.fsync(f.fileno())


def _check_download(
    part: pathlib.Path, url: str, size: Optional[int], sha256: Optional[str]
) -> None:
  """Size, checksum and file kind of a complete download; HubError naming the problem."""
  done = part.stat().st_size
  if size is not None and done != size:
    raise HubError(
        f'{url}: downloaded {done} bytes, expected {size} (truncated or a different ' 'file)'
    )
  if sha256 is not None:
    digest = hashlib.sha256()
    with open(part, 'rb') as f:
      while block := f.read(_CHUNK):
        digest.update(block)
    if digest.hexdigest() != sha256:
      raise HubError(f'{url}: SHA-256 {digest.hexdigest()} does not match the expected {sha256}')
  with open(part, 'rb') as f:
    head = f.read(64)
  if _looks_like_html(head):
    raise _html_error(url)
  kind = checkpoint_files.sniff(part)
  if kind != 'msgpack':
    raise HubError(f'{url}: not a Scenic msgpack checkpoint (file kind: {kind})')


# --------------------------------------------------------------------------------------------
# Hugging Face.
# --------------------------------------------------------------------------------------------


def _import_hf(label: str) -> types.SimpleNamespace:
  """huggingface_hub's submodules this module uses, imported explicitly (the package's lazy
  top-level attributes differ between versions: 2.x no longer exposes `constants`)."""
  try:
    # pylint: disable=g-import-not-at-top
    import huggingface_hub.constants
    import huggingface_hub.errors
    import huggingface_hub.file_download
  except ImportError:
    raise HubError(
        f'checkpoint {label}: Hugging Face ids need huggingface_hub; {HUB_EXTRA_HINT}'
    ) from None
  errors = huggingface_hub.errors
  return types.SimpleNamespace(
      constants=huggingface_hub.constants,
      errors=errors,
      download=huggingface_hub.file_download.hf_hub_download,
      from_cache=huggingface_hub.file_download.try_to_load_from_cache,
      # 1.x split EntryNotFoundError into Local- and RemoteEntryNotFoundError; in 0.x the base
      # class is the remote one (its Local subclass is caught first).
      remote_missing=getattr(errors, 'RemoteEntryNotFoundError', errors.EntryNotFoundError),
  )


def hf_cache_dir() -> Optional[str]:
  """`HF_HUB_CACHE`, else `HF_HOME/hub` (read at call time); None = huggingface_hub's default."""
  if os.environ.get('HF_HUB_CACHE'):
    return os.path.expanduser(os.environ['HF_HUB_CACHE'])
  if os.environ.get('HF_HOME'):
    return os.path.join(os.path.expanduser(os.environ['HF_HOME']), 'hub')
  return None


def hf_offline(hf: Optional[types.SimpleNamespace] = None) -> bool:
  """`HF_HUB_OFFLINE` set to 1/true/yes/on now, or when huggingface_hub was imported (`hf`: the
  namespace of `_import_hf`)."""
  if os.environ.get('HF_HUB_OFFLINE', '').strip().lower() in ('1', 'true', 'yes', 'on'):
    return True
  return bool(hf is not None and hf.constants.HF_HUB_OFFLINE)


def _one_line(e: BaseException) -> str:
  return ' '.join(str(e).split()) or type(e).__name__


def _http_status(e: BaseException) -> Optional[int]:
  """The HTTP status of a huggingface_hub error (its requests or httpx response), if any."""
  status = getattr(getattr(e, 'response', None), 'status_code', None)
  return status if isinstance(status, int) else None


def _cause(e: BaseException) -> str:
  """The first line of what made huggingface_hub give up (its error wraps the real one)."""
  inner = e.__cause__ or e.__context__
  if inner is None:
    return ''
  if _http_status(inner):
    return f'HTTP {_http_status(inner)}'
  return f'{type(inner).__name__}: {_one_line(inner).split(". ")[0]}'[:200]


def fetch_hf(
    repo_id: str, revision: Optional[str] = None, *, could_be_path: bool = False
) -> pathlib.Path:
  """A Hugging Face OWL-ViT repo -> local directory with config.json + safetensors weights.

  Cached files are used without network access; missing ones are downloaded unless offline.
  `could_be_path`: the name was written without `hf:` and may be a mistyped path (the message
  for an unknown repository then says both were tried).

  Raises:
    HubError: one line: huggingface_hub missing, unknown / gated repo or revision, Hub not
      reachable, files not cached while offline, or no usable weights file.
  """
  label = str(HubName('hf', repo_id, revision))
  hf = _import_hf(label)
  cache, offline = hf_cache_dir(), hf_offline(hf)
  where = cache or hf.constants.HF_HUB_CACHE
  errors = hf.errors

  def get(filename: str) -> Optional[str]:
    """Local path of `filename`; None when the repo lacks it (or, offline, it is not cached)."""
    cached = hf.from_cache(repo_id, filename, cache_dir=cache, revision=revision)
    if isinstance(cached, str):
      return cached
    if cached is not None or offline:  # known to be absent / no network allowed
      return None
    try:
      return hf.download(repo_id, filename, revision=revision, cache_dir=cache)
    except errors.LocalEntryNotFoundError as e:  # (a subclass of EntryNotFoundError)
      cause = _cause(e)
      raise HubError(
          f'checkpoint {label}: cannot reach the Hugging Face Hub at '
          f'{hf.constants.ENDPOINT}{f" ({cause})" if cause else ""}, and {filename} '
          f'is not in the cache {where}'
      ) from None
    except hf.remote_missing:
      return None
    except errors.GatedRepoError as e:  # (a subclass of RepositoryNotFoundError)
      raise HubError(
          f'checkpoint {label}: a gated model on the Hugging Face Hub '
          f'({_http_status(e) or "refused"}); accept its terms on the model page and '
          'log in (hf auth login, or HF_TOKEN)'
      ) from None
    except errors.RepositoryNotFoundError as e:
      status = _http_status(e) or 'not found'
      if could_be_path:
        raise HubError(
            f'checkpoint {label}: no such file or directory, and no model of that '
            f'name on the Hugging Face Hub ({status})'
        ) from None
      raise HubError(
          f'checkpoint {label}: no model of that name on the Hugging Face Hub '
          f'({status}; a private model needs a token: hf auth login, or HF_TOKEN)'
      ) from None
    except errors.RevisionNotFoundError as e:
      raise HubError(
          f'checkpoint {label}: the Hugging Face model {repo_id} has no revision '
          f'{revision!r} ({_http_status(e) or "not found"})'
      ) from None
    except errors.HfHubHTTPError as e:
      raise HubError(
          f'checkpoint {label}: {filename}: the Hugging Face Hub answered '
          f'{f"HTTP {_http_status(e)}" if _http_status(e) else _one_line(e)[:200]}'
      ) from None
    except Exception as e:  # pylint: disable=broad-except  # network / disk: one line, no trace
      raise HubError(
          f'checkpoint {label}: {filename}: {type(e).__name__}: ' f'{_one_line(e)[:200]}'
      ) from None

  config = get(_HF_CONFIG)
  if config is None:
    if offline:
      raise HubError(
          f'checkpoint {label}: not in the Hugging Face cache {where}, and '
          'HF_HUB_OFFLINE is set (no downloads); run once online or unset it'
      )
    raise HubError(
        f'checkpoint {label}: the repository has no {_HF_CONFIG}; not a Hugging Face '
        'OWL-ViT / OWLv2 model'
    )
  snapshot = pathlib.Path(config).parent
  if get(_HF_SAFETENSORS) is not None:
    return snapshot
  index = get(_HF_INDEX)
  if index is not None:
    shards = sorted(set(json.loads(pathlib.Path(index).read_text())['weight_map'].values()))
    missing = [s for s in shards if get(s) is None]
    if missing:
      raise HubError(
          f'checkpoint {label}: safetensors shard {missing[0]} is '
          f'{"not cached (HF_HUB_OFFLINE is set)" if offline else "missing"}'
      )
    return snapshot
  pickle = get(_HF_PICKLE)
  if pickle is not None:
    return _safetensors_from_pytorch(label, repo_id, snapshot, pathlib.Path(pickle))
  raise HubError(
      f'checkpoint {label}: no {_HF_SAFETENSORS}, sharded safetensors or {_HF_PICKLE} '
      f'{"in the cache (HF_HUB_OFFLINE is set)" if offline else "in the repository"}'
  )


def _safetensors_from_pytorch(
    label: str, repo_id: str, snapshot: pathlib.Path, pickle: pathlib.Path
) -> pathlib.Path:
  """Converts a PyTorch-only snapshot once (torch.load(weights_only=True)) to a cached dir."""
  dest = cache_dir() / 'hf-safetensors' / repo_id.replace('/', '--') / snapshot.name
  if (dest / _HF_SAFETENSORS).is_file():
    return dest
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise HubError(
        f'checkpoint {label}: the repository has only {_HF_PICKLE}, a PyTorch pickle; '
        'install torch (pip install torch) to read it with torch.load(weights_only='
        'True), which cannot run code, or convert it to safetensors yourself'
    ) from None
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  try:
    state = torch.load(pickle, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # torch's restricted unpickler errors
    raise HubError(
        f'checkpoint {label}: {pickle.name} cannot be read with '
        f'torch.load(weights_only=True) ({type(e).__name__}: {_one_line(e)[:200]})'
    ) from None
  if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
    raise HubError(f'checkpoint {label}: {pickle.name} is not a state dict of tensors')
  arrays = {
      k: (v.float() if v.is_floating_point() else v).contiguous().numpy() for k, v in state.items()
  }
  logging.info('checkpoint %s: converting %s to safetensors in %s', label, pickle, dest)
  with fileio.replace_directory(dest) as tmp:
    safetensors.numpy.save_file(arrays, str(tmp / _HF_SAFETENSORS))
    shutil.copyfile(snapshot / _HF_CONFIG, tmp / _HF_CONFIG)
  return dest
