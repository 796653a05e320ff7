"""LoRA adapters; per-tenant output safety filter.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("tenants", sa.Column("safety_action", sa.String(20), nullable=True))
    op.add_column("tenants", sa.Column("safety_threshold", sa.Float, nullable=False,
                                       server_default="0.8"))
    op.create_table(
        "loras",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("tenant_id", sa.String(36), sa.ForeignKey("tenants.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("family", sa.String(20), nullable=False),
        sa.Column("base_model", sa.String(100), nullable=False),
        sa.Column("key", sa.String(500), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("format", sa.String(20), nullable=False),
        sa.Column("rank", sa.Integer, nullable=False),
        sa.Column("info", sa.JSON, nullable=False),
        sa.Column("source", sa.String(20), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_loras_tenant_created", "loras", ["tenant_id", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_loras_tenant_created", table_name="loras")
    op.drop_table("loras")
    op.drop_column("tenants", "safety_threshold")
    op.drop_column("tenants", "safety_action")
