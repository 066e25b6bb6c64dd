"""Job control: cancellation requests, the measured report of a job, the objective of an auto search.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("report", sa.JSON))
        batch.add_column(sa.Column("objective", sa.String(16)))
        batch.add_column(sa.Column("preset", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("preset")
        batch.drop_column("objective")
        batch.drop_column("report")
        batch.drop_column("cancel_requested")
