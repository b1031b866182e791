"""tasks.published_at: when the broker confirmed the task (NULL while the publish is under way)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("published_at", sa.DateTime(timezone=True), nullable=True))
    # Records made before this revision were only kept once their publish had succeeded.
    op.execute("UPDATE tasks SET published_at = enqueued_at")


def downgrade() -> None:
    op.drop_column("tasks", "published_at")
