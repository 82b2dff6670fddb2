"""The service's app for gunicorn, for ``python -m bench.serving`` only.

gunicorn imports ``app`` in each worker; the config path comes from ``CALLSCREEN_CONFIG``.
``create_app`` does no I/O, so building it at import is safe.
"""

from __future__ import annotations

import os

from core.config import load_config
from service.app import create_app

app = create_app(load_config(os.environ["CALLSCREEN_CONFIG"]))
