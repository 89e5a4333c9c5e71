"""The playground page in a real headless browser (Debian's chromium + chromedriver, selenium).

Skipped, with the reason, when selenium or the browser is missing (`.ci/run` installs them).
Set CLIPCROP_PLAYGROUND_SCREENSHOT=path.png to save the screenshot used in the README.
"""

from __future__ import annotations

import io
import os
import shutil

import httpx
import numpy as np
from PIL import Image
import pytest

pytest.importorskip('fastapi', reason='the serve extra (fastapi, uvicorn, python-multipart)')
webdriver = pytest.importorskip('selenium.webdriver', reason='selenium is not installed')
from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
from selenium.webdriver.support import ui  # pylint: disable=g-import-not-at-top

from clipcrop_jax import cropper as cropper_lib  # pylint: disable=g-import-not-at-top
from clipcrop_jax import model as model_lib  # pylint: disable=g-import-not-at-top
from clipcrop_jax.owlvit import detect  # pylint: disable=g-import-not-at-top
from clipcrop_jax.serving import http as serve_http  # pylint: disable=g-import-not-at-top
from clipcrop_jax.serving import service as serve_service  # pylint: disable=g-import-not-at-top
from clipcrop_jax.serving import testing as serve_testing  # pylint: disable=g-import-not-at-top

BROWSERS = ('chromium', 'chromium-browser', 'google-chrome')
DRIVERS = ('chromedriver',)


def _which(names) -> str | None:
  return next((path for path in map(shutil.which, names) if path), None)


@pytest.fixture(scope='module')
def browser():
  binary, driver_path = _which(BROWSERS), _which(DRIVERS)
  if binary is None or driver_path is None:
    pytest.skip(
        "no headless browser: install Debian's chromium and chromium-driver "
        '(apt-get install -y chromium chromium-driver)'
    )
  options = webdriver.ChromeOptions()
  options.binary_location = binary
  for arg in (
      '--headless=new',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-dev-shm-usage',
      '--window-size=1280,900',
  ):
    options.add_argument(arg)
  driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))
  yield driver
  driver.quit()


@pytest.mark.slow  # ~25 s: compiles the tiny model, starts a browser
def test_playground_uploads_and_draws_ranked_crops(browser, tmp_path):
  # Subject-aware union and box voting: the page draws each query's selection by role and says
  # which crop is the fused one.
  config_model = model_lib.TINY.replace(selection_union='subject', fuse_top_k=3)
  cropper = cropper_lib.ClipCropper.init_random(config_model, keyword_pipeline='rules')
  text = 'a red square next to a blue disc'

  config = serve_service.ServeConfig(warmup=False)
  photo = tmp_path / 'scene.png'
  Image.fromarray(detect.demo_image()).save(photo)
  with serve_testing.BackgroundServer(serve_http.create_app(cropper, config), config) as server:
    browser.get(server.url + '/')
    browser.find_element(By.ID, 'image').send_keys(str(photo))
    browser.find_element(By.ID, 'text').send_keys(text)
    ui.Select(browser.find_element(By.ID, 'aspect_ratio')).select_by_visible_text('4:3')
    top_k = browser.find_element(By.ID, 'top_k')
    top_k.clear()
    top_k.send_keys('4')
    browser.find_element(By.ID, 'go').click()
    ui.WebDriverWait(browser, 60).until(
        lambda d: d.execute_script('return window.lastResult !== null')
        or 'error' in d.find_element(By.ID, 'status').get_attribute('class')
    )
    status = browser.find_element(By.ID, 'status')
    assert 'error' not in status.get_attribute('class'), status.text
    shown = browser.execute_script('return window.lastResult')
    boxes = browser.find_elements(By.CSS_SELECTOR, '#overlay rect.crop-box')
    thumbs = browser.find_elements(By.CSS_SELECTOR, '#thumbs .thumb')
    view_box = browser.execute_script(
        "return document.getElementById('overlay').getAttribute('viewBox')"
    )
    query_rects = browser.find_elements(By.CSS_SELECTOR, '#overlay rect.query-box')
    legend = [li.text for li in browser.find_elements(By.CSS_SELECTOR, '#queries li')]
    legend_shown = browser.find_element(By.ID, 'legend').is_displayed()
    captions = [t.text for t in thumbs]
    # The same request through the API directly.
    with httpx.Client(timeout=60) as http:
      direct = http.post(
          server.url + '/v1/crops',
          files={'image': ('s.png', photo.read_bytes())},
          data={'text': text, 'aspect_ratio': '4:3', 'top_k': '4'},
      ).json()
    if os.environ.get('CLIPCROP_PLAYGROUND_SCREENSHOT'):
      browser.save_screenshot(os.environ['CLIPCROP_PLAYGROUND_SCREENSHOT'])
  assert shown['crops'] == direct['crops'] and len(shown['crops']) >= 1
  assert len(boxes) == len(thumbs) == len(shown['crops'])
  for rect, crop in zip(boxes, shown['crops']):  # drawn where the service says, in image pixels
    x0, y0, x1, y1 = crop['box']
    drawn = [float(rect.get_attribute(k)) for k in ('x', 'y', 'width', 'height')]
    np.testing.assert_allclose(drawn, [x0, y0, x1 - x0, y1 - y0], rtol=1e-6)
  assert view_box == '0 0 540 360'
  # What each query selected: one dashed box per query, coloured by role, and a line each.
  queries = shown['crops'][0]['queries']
  assert [(q['text'], q['role']) for q in queries] == [
      (text, 'caption'),
      ('a red square', 'subject'),
      ('a blue disc', 'context'),
  ]
  assert [r.get_attribute('class') for r in query_rects] == [
      f'query-box role-{q["role"]}' for q in queries
  ]
  subject_colour = query_rects[1].get_attribute('stroke')
  assert subject_colour != query_rects[2].get_attribute('stroke')
  for rect, q in zip(query_rects, queries):
    x0, y0, x1, y1 = q['box']
    drawn = [float(rect.get_attribute(k)) for k in ('x', 'y', 'width', 'height')]
    np.testing.assert_allclose(drawn, [x0, y0, x1 - x0, y1 - y0], rtol=1e-6)
  assert legend_shown and len(legend) == 3
  assert legend[2].startswith('context: \u201ca blue disc\u201d') and 'context only' in legend[2]
  assert 'in the union box' in legend[1]
  # The first crop is the fused one (box voting over the 3 best), and the page says so.
  assert shown['crops'][0]['fused'] and not any(c['fused'] for c in shown['crops'][1:])
  assert 'fused' in captions[0] and all('fused' not in c for c in captions[1:])
  # Each thumbnail is the crop's pixels, downloadable as a PNG.
  link = thumbs[0].find_element(By.TAG_NAME, 'a')
  assert link.get_attribute('download') == 'crop-1.png'
  href = link.get_attribute('href')
  assert href.startswith('data:image/png;base64,')
  import base64  # pylint: disable=g-import-not-at-top

  thumb = np.asarray(Image.open(io.BytesIO(base64.b64decode(href.split(',', 1)[1]))).convert('RGB'))
  x0, y0, x1, y1 = (round(v) for v in shown['crops'][0]['box'])
  want = detect.demo_image()[y0:y1, x0:x1].astype(int)
  assert thumb.shape == want.shape and np.abs(thumb.astype(int) - want).mean() < 8
