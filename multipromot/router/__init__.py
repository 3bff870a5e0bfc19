"""The router: which bank prompt (or none) each input gets.

``base`` holds the decision record and the strategy protocol, ``signature`` and ``similarity``
the two format tests, ``router`` the :class:`Router` that chains them (see its docstring).
"""

from multipromot.router.base import ExplicitTask, Route, RouterEntry, RouteStrategy
from multipromot.router.router import Router, calibrated_router, evaluate_routing, router_entries
from multipromot.router.signature import SignatureMatch
from multipromot.router.similarity import SimilarityFallback

__all__ = [
    "Router",
    "Route",
    "RouterEntry",
    "RouteStrategy",
    "ExplicitTask",
    "SignatureMatch",
    "SimilarityFallback",
    "calibrated_router",
    "router_entries",
    "evaluate_routing",
]
