"""projects: a revision per change for the WatchProjects feed, indexes for ListProjects

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

import secrets
import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# ListProjects' "start_date desc" puts projects without a date last: it orders by this. The
# stand-in day is one each driver reads back as datetime.date.min and writes from it again:
# asyncpg maps date.min to PostgreSQL's -infinity (so 0001-01-01 would not round-trip there).
START_SORT = {
    "postgresql": "coalesce(start_date, '-infinity'::date)",
    "sqlite": "coalesce(start_date, '0001-01-01')",
}
TRIGRAM_INDEXES = {
    "ix_projects_title_trgm": "title",
    "ix_projects_description_trgm": "description",
}


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    # Projects stored before the feed existed are its beginning, at revision 0.
    op.add_column(
        "projects", sa.Column("revision", sa.BigInteger(), nullable=False, server_default="0")
    )
    op.add_column(
        "projects",
        sa.Column(
            "start_sort",
            sa.Date(),
            # SQLite adds only virtual generated columns to a table that exists.
            sa.Computed(START_SORT["postgresql" if postgres else "sqlite"], persisted=postgres),
        ),
    )
    op.create_index("ix_projects_revision", "projects", ["revision", "id"])
    op.create_index("ix_projects_updated_at", "projects", ["updated_at", "id"])
    op.create_index("ix_projects_first_seen_at", "projects", ["first_seen_at", "id"])
    op.create_index("ix_projects_start_sort", "projects", ["start_sort", "id"])
    op.create_index("ix_projects_active_updated_at", "projects", ["is_active", "updated_at", "id"])
    op.create_table(
        "feed",
        sa.Column("id", sa.Integer(), primary_key=True),
        # Which deployment made a cursor or a page token: one database, one deployment.
        sa.Column("deployment", sa.String(36), nullable=False),
        # Signs page tokens and cursors when TOKEN_SIGNING_KEY is unset: shared by every
        # gateway of the deployment, and the same after a restart.
        sa.Column("signing_key", sa.String(64), nullable=False),
        # The last revision handed out; bumped, under its row lock, by each committing change.
        sa.Column("revision", sa.BigInteger(), nullable=False),
    )
    op.bulk_insert(
        sa.table(
            "feed",
            sa.column("id", sa.Integer()),
            sa.column("deployment", sa.String()),
            sa.column("signing_key", sa.String()),
            sa.column("revision", sa.BigInteger()),
        ),
        [
            {
                "id": 1,
                "deployment": str(uuid.uuid4()),
                "signing_key": secrets.token_hex(32),
                "revision": 0,
            }
        ],
    )
    if postgres:
        # Substring search (ILIKE '%...%') by trigram index where the extension can be made
        # (pg_trgm is a trusted extension); without it the search still works, by a scan.
        op.execute(
            "DO $$ BEGIN CREATE EXTENSION IF NOT EXISTS pg_trgm; "
            "EXCEPTION WHEN OTHERS THEN RAISE NOTICE 'pg_trgm unavailable: %', SQLERRM; END $$"
        )
        for name, column in TRIGRAM_INDEXES.items():
            index = f"CREATE INDEX {name} ON projects USING gin ({column} gin_trgm_ops)"
            op.execute(
                "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm') "
                f"THEN {index}; END IF; END $$"
            )


def downgrade() -> None:
    for name in TRIGRAM_INDEXES:
        op.execute(f"DROP INDEX IF EXISTS {name}")
    op.drop_table("feed")
    for name in (
        "ix_projects_active_updated_at",
        "ix_projects_start_sort",
        "ix_projects_first_seen_at",
        "ix_projects_updated_at",
        "ix_projects_revision",
    ):
        op.drop_index(name, table_name="projects")
    op.drop_column("projects", "start_sort")
    op.drop_column("projects", "revision")
