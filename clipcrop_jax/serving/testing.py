"""Running the crop service in tests and tools: a server in a background thread, readiness."""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable
import urllib.request

import uvicorn

from clipcrop_jax.serving import http
from clipcrop_jax.serving import service as service_lib


class BackgroundServer:
  """The app on 127.0.0.1 (a free port unless given) in a daemon thread, for tests and tools.

  with BackgroundServer(http.create_app(cropper)) as server:
    httpx.get(server.url + '/healthz')
  """

  def __init__(
      self, app, config: service_lib.ServeConfig = service_lib.ServeConfig(), port: int = 0
  ):
    self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self._socket.bind(('127.0.0.1', port))
    self.port = self._socket.getsockname()[1]
    self.url = f'http://127.0.0.1:{self.port}'
    self.server = uvicorn.Server(
        http.uvicorn_config(app, '127.0.0.1', self.port, config, log_level='warning')
    )
    self._thread = threading.Thread(
        target=self.server.run,
        kwargs={'sockets': [self._socket]},
        name='clipcrop-uvicorn',
        daemon=True,
    )

  def __enter__(self) -> 'BackgroundServer':
    self._thread.start()
    deadline = time.monotonic() + 60
    while not self.server.started:
      if not self._thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError('the background server did not start')
      time.sleep(0.02)
    return self

  def __exit__(self, *exc) -> None:
    self.server.should_exit = True
    self._thread.join(60)
    self._socket.close()


def wait_until_ready(url: str, alive: Callable[[], bool], timeout_s: float = 600) -> None:
  """Polls `url + '/readyz'` until it answers 200 (a server started as a subprocess, for tests
  and tools); RuntimeError when `alive()` turns False or after `timeout_s`."""
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with urllib.request.urlopen(url + '/readyz', timeout=5) as response:
        if response.status == 200:
          return
    except OSError:  # refused (not listening yet), 503 (warming up), timeout
      pass
    if not alive() or time.monotonic() > deadline:
      raise RuntimeError(f'the service at {url} did not become ready')
    time.sleep(0.2)
