"""STIR/SHAKEN verification (an STI-VS in the policy): docs/stir-shaken.md.

:func:`make_verifier` builds a worker's :class:`~.verify.Verifier` from the config; its
certificate store must be closed (``await verifier.certs.close()``) when the app stops,
and its signature helper, if it has one, started and closed with the app.
"""

from __future__ import annotations

import os
from pathlib import Path

from core.config import Config, StirSettings
from core.store import RedisClient
from service.metrics import Metrics
from service.screening.stir.certs import TrustStore
from service.screening.stir.fetch import make_session
from service.screening.stir.helper import SignatureHelper, stall_limit
from service.screening.stir.store import CertStore
from service.screening.stir.verify import Verifier


def wanted(config: Config) -> bool:
    """Whether any policy has ``stir_*`` rules, or trust anchors are configured (explain)."""
    return config.stir.trust_anchors is not None or any(
        rule.match.startswith("stir_") for p in config.policies.values() for rule in p.rules
    )


def wants_helper(settings: StirSettings, workers: int) -> bool:
    """Whether each worker checks signatures in a helper process (``signature_helper``):
    ``auto`` when the cores this process may run on outnumber the workers, so that the
    helpers have cores of their own."""
    if settings.signature_helper != "auto":
        return settings.signature_helper == "always"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (cores or 1) > workers


def make_verifier(
    config: Config, redis: RedisClient | None, metrics: Metrics | None, workers: int = 1
) -> Verifier:
    """A worker's verifier, with a signature helper not started yet when it wants one
    (``await verifier.helper.start()``); call inside the running event loop (it opens a
    client session). ``workers``: the processes serving the config."""
    settings = config.stir

    def path(name: str) -> Path:
        found = Path(name)
        return found if found.is_absolute() else config.base_dir / found

    anchors = path(settings.trust_anchors) if settings.trust_anchors else None
    trust = TrustStore(anchors, tuple(path(name) for name in settings.crl_files))
    session = make_session(settings, str(config.base_dir))
    certs = CertStore(settings, trust, redis, session, metrics)
    helper = None
    if wants_helper(settings, workers):
        helper = SignatureHelper(stall_limit(config.handler.deadline_ms / 1000))
    return Verifier(settings, certs, config.caller.default_country, metrics, helper)
