"""Container health check: exit 0 when ``URL`` answers 200, 1 otherwise.

``python deploy/healthcheck.py http://127.0.0.1:9101/metrics``. When ``REEF_METRICS_KEY``
is set, the request carries ``Authorization: Bearer <key>`` (``/metrics`` requires it), so
a check of a protected endpoint tests the service, not the lock. Standard library only:
it runs in every image.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_SECONDS = 3.0


def healthy(url: str) -> bool:
    """Whether ``url`` answers 200 within the timeout."""
    request = urllib.request.Request(url)
    key = os.environ.get("REEF_METRICS_KEY", "")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


if __name__ == "__main__":
    sys.exit(0 if len(sys.argv) == 2 and healthy(sys.argv[1]) else 1)
