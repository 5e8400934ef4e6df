"""The serving suite's PostgreSQL variant: chosen tests of tests/serving run again with every service they start
(auth, storage, the scheduler, training, serving) on PostgreSQL (a database each, on tests/postgres.py's private
cluster) instead of their SQLite files: deploy, infer, switch versions and undeploy; bad deploy requests change
nothing; deployments come back after Triton and the service restart (read back from the database)."""

from __future__ import annotations

import pytest

from services.serving.store import MIGRATIONS as SERVING_MIGRATIONS
from tests.postgres import (  # noqa: F401 - fixtures
    assert_migrated_on_postgres,
    postgres_cluster,
    postgres_services_url,
    services_on_postgres,
)
from tests.serving.conftest import RunningServing
from tests.serving.test_deployments import (  # noqa: F401 - run here on PostgreSQL
    test_bad_deploy_requests_change_nothing,
    test_deploy_infer_switch_undeploy,
    test_triton_restart_and_service_restart_reload_deployments,
)

pytestmark = pytest.mark.slow


async def test_serving_runs_on_postgresql_with_its_migrations_recorded(
    serving: RunningServing,
    postgres_services_url: str,  # noqa: F811 - the fixture imported above
) -> None:
    assert serving.settings.database_url == postgres_services_url
    assert_migrated_on_postgres(postgres_services_url, {"serving": SERVING_MIGRATIONS})
