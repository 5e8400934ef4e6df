"""The training suite's PostgreSQL variant: chosen tests of tests/training run again with every service they start
(auth, storage, the scheduler, training) on PostgreSQL (a database each, on tests/postgres.py's private cluster)
instead of their SQLite files: a fine-tune end to end (jobs, events, registry, lineage), a job queued on the
scheduler's reason and cancelled, base-model registration errors, and a training restart mid-job (the stored
history and relay position carry on)."""

from __future__ import annotations

import pytest

from services.auth.store import MIGRATIONS as AUTH_MIGRATIONS
from services.scheduler.store import MIGRATIONS as SCHEDULER_MIGRATIONS
from services.storage.schema import MIGRATIONS as STORAGE_MIGRATIONS
from services.training.store import MIGRATIONS as TRAINING_MIGRATIONS
from tests.postgres import (  # noqa: F401 - fixtures
    assert_migrated_on_postgres,
    postgres_cluster,
    postgres_services_url,
    services_on_postgres,
)
from tests.training.conftest import RunningTraining
from tests.training.test_service import (  # noqa: F401 - run here on PostgreSQL
    test_a_job_waits_queued_with_the_schedulers_reason_and_cancels_from_training,
    test_a_training_restart_while_the_scheduler_runs_the_job_ends_it_exactly_once,
    test_base_model_registration_errors,
    test_fine_tune_end_to_end,
)

pytestmark = pytest.mark.slow


async def test_the_services_run_on_postgresql_with_their_migrations_recorded(
    training: RunningTraining,
    postgres_services_url: str,  # noqa: F811 - the fixture imported above
) -> None:
    assert training.settings.database_url == training.scheduler.settings.database_url == postgres_services_url
    migrations = {
        "auth": AUTH_MIGRATIONS,
        "storage": STORAGE_MIGRATIONS,
        "scheduler": SCHEDULER_MIGRATIONS,
        "training": TRAINING_MIGRATIONS,
    }
    assert_migrated_on_postgres(postgres_services_url, migrations)
