"""duplicate lookup index: KNN over names per birth date

Revision ID: 0003_write_path
Revises: 0002_outbox_notify
Create Date: 2026-11-26

Every create looks up likely duplicates (same birth date and a similar or same-sounding
name). With only the birth-date index, that compared the new name with every patient of
the birth date: fine for real data (a few dozen per day), but linear in how many share it,
~30 ms per create at 2,400 (the write bench). One GiST index over (birth date, dmetaphone
code, trigrams of lower(name)) serves both branches as a nearest-neighbour scan that reads
about ``limit`` rows. The name is indexed as lower(name), the duplicate query's expression,
so the search's ``name ILIKE`` keeps its GIN index (a GiST on plain name tempts the planner).
``btree_gist`` (contrib, a trusted extension) lets GiST index the date and the code. Building
the index on an existing big table takes a while, once, at this upgrade.
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0003_write_path'
down_revision: str | None = '0002_outbox_notify'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS btree_gist")
    op.execute("CREATE INDEX ix_patients_duplicate_lookup ON patients "
               "USING gist (date_of_birth, dmetaphone(name), lower(name) gist_trgm_ops)")


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS ix_patients_duplicate_lookup")
