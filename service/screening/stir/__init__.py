"""STIR/SHAKEN verification (an STI-VS in the policy): docs/stir-shaken.md.

:func:`make_verifier` builds a worker's :class:`~.verify.Verifier` from the config; its
certificate store must be closed (``await verifier.certs.close()``) when the app stops.
"""

from __future__ import annotations

from pathlib import Path

from core.config import Config
from core.store import RedisClient
from service.metrics import Metrics
from service.screening.stir.certs import TrustStore
from service.screening.stir.fetch import make_session
from service.screening.stir.store import CertStore
from service.screening.stir.verify import Verifier


def wanted(config: Config) -> bool:
    """Whether any policy has ``stir_*`` rules, or trust anchors are configured (explain)."""
    return config.stir.trust_anchors is not None or any(
        rule.match.startswith("stir_") for p in config.policies.values() for rule in p.rules
    )


def make_verifier(config: Config, redis: RedisClient | None, metrics: Metrics | None) -> Verifier:
    """A worker's verifier; call inside the running event loop (it opens a client session)."""
    settings = config.stir

    def path(name: str) -> Path:
        found = Path(name)
        return found if found.is_absolute() else config.base_dir / found

    anchors = path(settings.trust_anchors) if settings.trust_anchors else None
    trust = TrustStore(anchors, tuple(path(name) for name in settings.crl_files))
    session = make_session(settings, str(config.base_dir))
    certs = CertStore(settings, trust, redis, session, metrics)
    return Verifier(settings, certs, config.caller.default_country, metrics)
