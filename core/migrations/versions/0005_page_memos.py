"""page_memos (a page's validators and links, for conditional GETs), tasks.not_modified

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "page_memos",
        sa.Column("url", sa.String(2048), primary_key=True),
        sa.Column("etag", sa.Text(), nullable=True),
        sa.Column("last_modified", sa.Text(), nullable=True),
        sa.Column("links", sa.Text(), nullable=False),
        sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.add_column("tasks", sa.Column("not_modified", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:  # SQLite drops a column by a table copy
        batch.drop_column("not_modified")
    op.drop_table("page_memos")
