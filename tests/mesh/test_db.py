"""The shared persistence layer: recorded migrations per component, and one URL serving several services."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Column, Integer, MetaData, Table, inspect, text

from services.mesh.config import MeshSettings, load_settings
from services.mesh.db import Migration, open_database


def _table(name: str) -> Migration:
    def apply(conn: object) -> None:
        meta = MetaData()
        Table(name, meta, Column("id", Integer, primary_key=True))
        meta.create_all(conn)  # type: ignore[arg-type]

    return Migration(1, f"create {name}", apply)


def test_components_sharing_a_database_keep_their_own_migration_history(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'shared.db'}")
    assert db.migrate([_table("alpha_things")], "alpha") == 1
    # A second service with its own version 1 on the same database still gets its tables.
    assert db.migrate([_table("beta_things")], "beta") == 1
    assert {"alpha_things", "beta_things"} <= set(inspect(db.engine).get_table_names())
    # Re-running is a no-op.
    db.migrate([_table("alpha_things")], "alpha")
    with db.engine.connect() as conn:
        rows = conn.execute(text("SELECT component, version FROM schema_migrations ORDER BY component")).all()
    assert [tuple(r) for r in rows] == [("alpha", 1), ("beta", 1)]
    assert db.engine.dialect.name == "sqlite"
    with db.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_database_url_names_each_service(tmp_path: Path) -> None:
    default = load_settings(MeshSettings, {"AIDC_DATA_DIR": str(tmp_path)})
    assert default.database_url_for("auth") == f"sqlite:///{tmp_path.resolve()}/auth/auth.db"
    shared = load_settings(MeshSettings, {"AIDC_DATABASE_URL": "postgresql+psycopg://u:p@db/aidc_{service}"})
    assert shared.database_url_for("billing") == "postgresql+psycopg://u:p@db/aidc_billing"
