"""The scenes catalog: places with their background images, actions with their shots.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def _tenant() -> sa.Column[str]:
    return sa.Column("tenant_id", sa.String(36), sa.ForeignKey("tenants.id", ondelete="CASCADE"),
                     nullable=False)


def upgrade() -> None:
    op.create_table(
        "places",
        sa.Column("id", sa.String(36), primary_key=True),
        _tenant(),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("tenant_id", "name", name="uq_places_tenant_name"),
    )
    op.create_index("ix_places_tenant_created", "places", ["tenant_id", "created_at", "id"])
    op.create_table(
        "place_images",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("tenant_id", sa.String(36), nullable=False),
        sa.Column("place_id", sa.String(36), sa.ForeignKey("places.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("key", sa.String(500), nullable=False),
        sa.Column("thumb_key", sa.String(500), nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("content_type", sa.String(100), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("place_id", "name", name="uq_place_images_place_name"),
    )
    op.create_index("ix_place_images_place_created", "place_images",
                    ["place_id", "created_at", "id"])
    op.create_table(
        "actions",
        sa.Column("id", sa.String(36), primary_key=True),
        _tenant(),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("embedding", sa.JSON, nullable=True),
        sa.Column("embedding_hash", sa.String(64), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("tenant_id", "name", name="uq_actions_tenant_name"),
    )
    op.create_index("ix_actions_tenant_created", "actions", ["tenant_id", "created_at", "id"])
    op.create_table(
        "action_shots",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("action_id", sa.String(36), sa.ForeignKey("actions.id", ondelete="CASCADE"),
                  nullable=False, index=True),
        sa.Column("shot", sa.String(10), nullable=False),
        sa.Column("pose_kind", sa.String(10), nullable=False),
        sa.Column("control", sa.String(20), nullable=False),
        sa.Column("keypoints", sa.JSON, nullable=True),
        sa.Column("canvas_width", sa.Integer, nullable=False),
        sa.Column("canvas_height", sa.Integer, nullable=False),
        sa.Column("pose_image_key", sa.String(500), nullable=True),
        sa.Column("body_mask_key", sa.String(500), nullable=True),
        sa.Column("face_mask_key", sa.String(500), nullable=True),
        sa.Column("placement", sa.JSON, nullable=True),
        sa.UniqueConstraint("action_id", "shot", name="uq_action_shots_action_shot"),
    )


def downgrade() -> None:
    op.drop_table("action_shots")
    op.drop_index("ix_actions_tenant_created", table_name="actions")
    op.drop_table("actions")
    op.drop_index("ix_place_images_place_created", table_name="place_images")
    op.drop_table("place_images")
    op.drop_index("ix_places_tenant_created", table_name="places")
    op.drop_table("places")
