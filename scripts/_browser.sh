# Sourced by test.sh: Debian's chromium and chromedriver for the web page's test
# (tests/test_web_page.py). Installed when missing and this is a Debian machine
# we may install on (root, apt-get); elsewhere that test skips (fails with CI=true).
# CELERY_TX_NO_BROWSER=1: do not install it (the browser test then skips).
if [ -n "${CELERY_TX_NO_BROWSER:-}" ]; then
  :
elif [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium and chromium-driver for the browser test..." >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      chromium chromium-driver >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; } \
      || echo "could not install chromium: the browser test will not run" >&2
  else
    echo "no chromium: the browser test will not run (apt-get install chromium chromium-driver)" >&2
  fi
fi
