"""The scheduler suite's PostgreSQL variant: chosen service tests of tests/scheduler run again with auth and the
scheduler on PostgreSQL (a database each, on tests/postgres.py's private cluster) instead of their SQLite files: a
job's life in its own process, quotas end to end, gangs, cancellation, idempotent submission, refused pool and node
changes. (The store on PostgreSQL: test_store_postgres.py; two scheduler replicas on one: test_replicas.py.)"""

from __future__ import annotations

import pytest

from services.scheduler.store import MIGRATIONS as SCHEDULER_MIGRATIONS
from tests.postgres import (  # noqa: F401 - fixtures
    assert_migrated_on_postgres,
    postgres_cluster,
    postgres_services_url,
    services_on_postgres,
)
from tests.scheduler.service_support import RunningScheduler
from tests.scheduler.test_service_bad_input import (  # noqa: F401 - run here on PostgreSQL
    test_bad_pool_and_node_changes_are_refused_and_change_nothing,
)
from tests.scheduler.test_service_jobs import (  # noqa: F401 - run here on PostgreSQL
    test_a_gang_is_placed_all_at_once_or_not_at_all,
    test_a_job_runs_in_its_own_session_with_its_env_secret_and_trace_and_output_in_files,
    test_cancel_a_queued_job_and_a_running_one,
    test_submit_is_idempotent_on_its_key_per_tenant,
    test_the_tenants_quota_is_respected_end_to_end,
)

pytestmark = pytest.mark.slow


async def test_the_scheduler_runs_on_postgresql_with_its_migrations_recorded(
    scheduler: RunningScheduler,
    postgres_services_url: str,  # noqa: F811 - the fixture imported above
) -> None:
    assert scheduler.settings.database_url == postgres_services_url
    assert_migrated_on_postgres(postgres_services_url, {"scheduler": SCHEDULER_MIGRATIONS})
