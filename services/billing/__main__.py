"""Runs the billing service: python -m services.billing"""

from __future__ import annotations

from services.billing.config import BillingSettings
from services.billing.server import build_server
from services.mesh.server import run_service

if __name__ == "__main__":
    run_service("billing", BillingSettings.from_env, build_server)
