"""The crop service's command line (`python -m clipcrop_jax.serve --help`): `serving.http.main`."""

import sys

from clipcrop_jax.serving import http

if __name__ == '__main__':
  sys.exit(http.main())
