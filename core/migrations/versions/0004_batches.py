"""batches, and what the worker records of each task: its status, outcome and cancel

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TASK_COLUMNS = (
    sa.Column("batch_id", sa.String(36), nullable=True),
    # PENDING, STARTED, RETRY, then SUCCESS, FAILURE or REVOKED once finished_at is set.
    sa.Column("status", sa.String(16), nullable=False, server_default="PENDING"),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("found", sa.Integer(), nullable=True),
    sa.Column("created", sa.Integer(), nullable=True),
    sa.Column("updated", sa.Integer(), nullable=True),
    sa.Column("skipped", sa.Integer(), nullable=True),
    sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True),
)


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("client", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("first_page", sa.Integer(), nullable=False),
        sa.Column("last_page", sa.Integer(), nullable=False),
        sa.Column("until_known", sa.Boolean(), nullable=False),
        sa.Column("stop_page", sa.Integer(), nullable=True),
        # The next page to enqueue (last_page + 1 once all are).
        sa.Column("next_page", sa.Integer(), nullable=False),
        sa.Column("pages_total", sa.Integer(), nullable=False),
        sa.Column("pages_succeeded", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("pages_failed", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("pages_cancelled", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("found", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("created", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("updated", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("skipped", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("client", "request_id", name="uq_batches_client_request_id"),
    )
    op.create_index("ix_batches_enqueued_at", "batches", ["enqueued_at"])
    for column in TASK_COLUMNS:
        op.add_column("tasks", column)
    # Tasks already finished by the reconciler's verdict read FAILURE from now on.
    op.execute(
        "UPDATE tasks SET status = 'FAILURE', error = lost_reason, finished_at = enqueued_at "
        "WHERE lost_reason IS NOT NULL"
    )
    op.create_index("ix_tasks_batch_id", "tasks", ["batch_id", "page"])
    # ListTasks: a client's tasks newest first, with or without a status.
    op.create_index("ix_tasks_client_enqueued_at", "tasks", ["client", "enqueued_at", "id"])
    op.create_index(
        "ix_tasks_client_status_enqueued_at", "tasks", ["client", "status", "enqueued_at", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_client_status_enqueued_at", table_name="tasks")
    op.drop_index("ix_tasks_client_enqueued_at", table_name="tasks")
    op.drop_index("ix_tasks_batch_id", table_name="tasks")
    for column in reversed(TASK_COLUMNS):
        op.drop_column("tasks", column.name)
    op.drop_index("ix_batches_enqueued_at", table_name="batches")
    op.drop_table("batches")
