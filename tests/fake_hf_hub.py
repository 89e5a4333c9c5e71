"""A fake Hugging Face Hub on 127.0.0.1 for tests: what `hf_hub_download` asks, nothing more.

  with FakeHub() as hub:                      # a daemon thread; stopped on exit
    hub.add_repo('org/name', {'config.json': b'{}', 'model.safetensors': path_or_bytes})
    hub.add_repo('org/name', {...}, revision='v1')   # another branch / tag of the same repo
    env['HF_ENDPOINT'] = hub.endpoint           # what a child process is given
    hub.down = True                             # every request now gets 503
    hub.requests                                # [(method, path), ...] as they arrived

Answers `HEAD` and `GET` of `/{repo_id}/resolve/{revision}/{filename}` as the Hub does for a
plain (non-LFS, non-Xet) file: `ETag`, `X-Repo-Commit`, `Content-Length`, `Accept-Ranges` and,
for a GET with `Range: bytes=N-`, 206 with `Content-Range`. A revision is a branch/tag name or a
full 40-hex commit. Misses are 404 with the Hub's `X-Error-Code` (`RepoNotFound`,
`RevisionNotFound`, `EntryNotFound`), which huggingface_hub turns into its typed errors; any other
path is a plain 404. Bounded: at most `max_requests` requests (then 429, and `overflowed` is set),
a socket timeout per connection, and the server stops itself after `lifetime_s` seconds.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import pathlib
import re
import threading
import urllib.parse
from typing import Mapping, Union

Content = Union[bytes, os.PathLike]
_RESOLVE = re.compile(r'/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<revision>[^/]+)/(?P<file>.+)')
_COMMIT = re.compile(r'[0-9a-f]{40}')
_CHUNK = 1 << 20


class _File:
  """One served file: bytes in memory or a path read in chunks; ETag = SHA-256 of the content."""

  def __init__(self, content: Content):
    if isinstance(content, (bytes, bytearray)):
      self.data, self.path = bytes(content), None
      self.size, digest = len(self.data), hashlib.sha256(self.data)
    else:
      self.data, self.path = None, pathlib.Path(content)
      self.size, digest = self.path.stat().st_size, hashlib.sha256()
      with open(self.path, 'rb') as f:
        while block := f.read(_CHUNK):
          digest.update(block)
    self.etag = digest.hexdigest()

  def chunks(self, start: int):
    if self.data is not None:
      yield self.data[start:]
      return
    with open(self.path, 'rb') as f:
      f.seek(start)
      while block := f.read(_CHUNK):
        yield block


class FakeHub:
  """A loopback Hub server (see the module docstring); use as a context manager."""

  def __init__(
      self, max_requests: int = 400, lifetime_s: float = 900.0, socket_timeout_s: float = 20.0
  ):
    self.max_requests = max_requests
    self.down = False
    self.overflowed = False
    self.requests: list[tuple[str, str]] = []
    self._refs: dict[str, dict[str, str]] = {}  # repo -> {revision name: commit}
    self._commits: dict[str, dict[str, _File]] = {}  # commit -> {filename: file}
    self._lock = threading.Lock()
    hub = self

    class Handler(http.server.BaseHTTPRequestHandler):
      timeout = socket_timeout_s
      protocol_version = 'HTTP/1.1'

      def log_message(self, *args):  # quiet
        del args

      def do_HEAD(self):  # pylint: disable=invalid-name
        hub._answer(self, body=False)

      def do_GET(self):  # pylint: disable=invalid-name
        hub._answer(self, body=True)

    self._server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self._server.daemon_threads = True
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
    self._timer = threading.Timer(lifetime_s, self._server.shutdown)
    self._timer.daemon = True

  # -- set-up -------------------------------------------------------------------------------

  def add_repo(
      self,
      repo_id: str,
      files: Mapping[str, Content],
      revision: str = 'main',
      commit: str | None = None,
  ) -> str:
    """Publishes `files` as `revision` of `repo_id` (a new commit); returns the commit hash."""
    served = {name: _File(content) for name, content in files.items()}
    if commit is None:
      seed = repr((repo_id, revision, sorted((n, f.etag) for n, f in served.items())))
      commit = hashlib.sha1(seed.encode()).hexdigest()
    with self._lock:
      self._commits[commit] = served
      self._refs.setdefault(repo_id, {})[revision] = commit
    return commit

  def commit_of(self, repo_id: str, revision: str) -> str:
    """The commit hash `revision` of `repo_id` points at."""
    with self._lock:
      return self._refs[repo_id][revision]

  @property
  def endpoint(self) -> str:
    host, port = self._server.server_address[:2]
    return f'http://{host}:{port}'

  def __enter__(self) -> 'FakeHub':
    self._thread.start()
    self._timer.start()
    return self

  def __exit__(self, *exc) -> None:
    self._timer.cancel()
    self._server.shutdown()
    self._server.server_close()
    self._thread.join(timeout=10)

  def count(self) -> int:
    with self._lock:
      return len(self.requests)

  # -- serving ------------------------------------------------------------------------------

  def _answer(self, handler: http.server.BaseHTTPRequestHandler, body: bool) -> None:
    path = urllib.parse.urlsplit(handler.path).path
    with self._lock:
      self.requests.append((handler.command, path))
      if len(self.requests) > self.max_requests:
        self.overflowed = True
        status = 429
      else:
        status = 503 if self.down else 200
    if status != 200:
      self._send(handler, status, {'Retry-After': '1'})
      return
    m = _RESOLVE.fullmatch(path)
    if not m:
      self._send(handler, 404, {})
      return
    repo, revision = m['repo'], urllib.parse.unquote(m['revision'])
    filename = urllib.parse.unquote(m['file'])
    with self._lock:
      refs = self._refs.get(repo)
      commit = None if refs is None else refs.get(revision)
      if refs is not None and commit is None and _COMMIT.fullmatch(revision):
        commit = revision if revision in refs.values() else None
      file = None if commit is None else self._commits[commit].get(filename)
    if refs is None:
      self._send(
          handler, 404, {'X-Error-Code': 'RepoNotFound', 'X-Error-Message': 'Repository not found'}
      )
    elif commit is None:
      self._send(
          handler,
          404,
          {'X-Error-Code': 'RevisionNotFound', 'X-Error-Message': 'Invalid rev id: ' + revision},
      )
    elif file is None:
      self._send(
          handler,
          404,
          {
              'X-Error-Code': 'EntryNotFound',
              'X-Repo-Commit': commit,
              'X-Error-Message': 'Entry not found',
          },
      )
    else:
      self._send_file(handler, file, commit, body)

  @staticmethod
  def _send(handler, status: int, headers: Mapping[str, str]) -> None:
    handler.send_response(status)
    for key, value in headers.items():
      handler.send_header(key, value)
    handler.send_header('Content-Length', '0')
    handler.end_headers()

  @staticmethod
  def _send_file(handler, file: _File, commit: str, body: bool) -> None:
    start = send_ranged_headers(
        handler,
        file.size,
        {
            'ETag': f'"{file.etag}"',
            'X-Repo-Commit': commit,
            'Accept-Ranges': 'bytes',
            'Content-Type': 'application/octet-stream',
        },
        ranged=body,
    )
    if start is not None and body:
      try:
        for chunk in file.chunks(start):
          handler.wfile.write(chunk)
      except (BrokenPipeError, ConnectionResetError):
        pass


def send_ranged_headers(
    handler: http.server.BaseHTTPRequestHandler,
    size: int,
    headers: Mapping[str, str],
    ranged: bool = True,
) -> int | None:
  """Sends the status line and headers of a file of `size` bytes, honouring `Range: bytes=N-`
  (206 with Content-Range; 416 past the end); returns the first byte to send, or None when the
  answer (416) is complete."""
  start = 0
  match = re.fullmatch(r'bytes=(\d+)-', handler.headers.get('Range') or '')
  if ranged and match:
    start = int(match[1])
    if start >= size:
      handler.send_response(416)
      handler.send_header('Content-Range', f'bytes */{size}')
      handler.send_header('Content-Length', '0')
      handler.end_headers()
      return None
    handler.send_response(206)
    handler.send_header('Content-Range', f'bytes {start}-{size - 1}/{size}')
  else:
    handler.send_response(200)
  for key, value in headers.items():
    handler.send_header(key, value)
  handler.send_header('Content-Length', str(size - start))
  handler.end_headers()
  return start
