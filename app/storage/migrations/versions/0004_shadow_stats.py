"""Shadow statistics: how a shadow variant agrees with the variant that answered, summed over all processes.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "shadow_stats",
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("variant", sa.String(64), primary_key=True),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("rows", sa.BigInteger, nullable=False),
        sa.Column("agreement_sum", sa.Float, nullable=False),
        sa.Column("cosine_sum", sa.Float, nullable=False),
        sa.Column("classifier", sa.Boolean, nullable=False),
        sa.Column("primary_seconds", sa.Float, nullable=False),
        sa.Column("shadow_seconds", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("shadow_stats")
