"""Subjects: a person's photos on their way to a LoRA, their stage events, the lineage of
jobs to the LoRAs they used, and LoRA deletions under way.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("loras") as batch:
        batch.add_column(sa.Column("subject_id", sa.String(36), nullable=True))
        batch.create_index("ix_loras_subject_id", ["subject_id"])
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.add_column(sa.Column("subject_id", sa.String(36), nullable=True))
        batch.create_index("ix_webhook_deliveries_subject_id", ["subject_id"])
    op.create_table(
        "job_loras",
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("lora_id", sa.String(36), primary_key=True),
        sa.Column("tenant_id", sa.String(36), nullable=False),
        sa.Column("subject_id", sa.String(36), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=False),
    )
    op.create_index("ix_job_loras_lora_id", "job_loras", ["lora_id"])
    op.create_index("ix_job_loras_subject_id", "job_loras", ["subject_id"])
    op.create_table(
        "subjects",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("tenant_id", sa.String(36), sa.ForeignKey("tenants.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("class_word", sa.String(40), nullable=False),
        sa.Column("token", sa.String(40), nullable=False),
        sa.Column("preset", sa.String(20), nullable=False),
        sa.Column("training", sa.JSON, nullable=False),
        sa.Column("overrides", sa.JSON, nullable=False),
        sa.Column("caption", sa.Boolean, nullable=False),
        sa.Column("retain_photos", sa.Boolean, nullable=False),
        sa.Column("consent", sa.Text, nullable=False),
        sa.Column("webhook", sa.JSON, nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("photos", sa.Integer, nullable=False),
        sa.Column("duplicates", sa.JSON, nullable=False),
        sa.Column("dataset_id", sa.String(36), nullable=True),
        sa.Column("tagging_job_id", sa.String(36), nullable=True),
        sa.Column("training_job_id", sa.String(36), nullable=True),
        sa.Column("lora_id", sa.String(36), nullable=True),
        sa.Column("trigger_words", sa.JSON, nullable=False),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text, nullable=True),
        sa.Column("purged", sa.JSON, nullable=True),
        sa.Column("deletion", sa.JSON, nullable=True),
        sa.Column("last_seq", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
        sa.UniqueConstraint("tenant_id", "token", name="uq_subjects_tenant_token"),
    )
    op.create_index("ix_subjects_tenant_created", "subjects", ["tenant_id", "created_at", "id"])
    op.create_index("ix_subjects_status", "subjects", ["status"])
    op.create_index("ix_subjects_tagging_job_id", "subjects", ["tagging_job_id"])
    op.create_index("ix_subjects_training_job_id", "subjects", ["training_job_id"])
    op.create_table(
        "subject_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("subject_id", sa.String(36), sa.ForeignKey("subjects.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("type", sa.String(20), nullable=False),
        sa.Column("stage", sa.String(20), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
        sa.UniqueConstraint("subject_id", "seq", name="uq_subject_events_seq"),
    )
    op.create_index("ix_subject_events_subject_id", "subject_events", ["subject_id"])
    op.create_table(
        "lora_deletions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("tenant_id", sa.String(36), sa.ForeignKey("tenants.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("plan", sa.JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("lora_deletions")
    op.drop_table("subject_events")
    op.drop_table("subjects")
    op.drop_table("job_loras")
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_index("ix_webhook_deliveries_subject_id")
        batch.drop_column("subject_id")
    with op.batch_alter_table("loras") as batch:
        batch.drop_index("ix_loras_subject_id")
        batch.drop_column("subject_id")
