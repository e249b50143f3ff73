import pytest

from audio_pipeline import db

pytestmark = pytest.mark.integration


def test_pool_gives_dict_rows_on_the_pipeline_database(settings):
    p = db.pool(settings)
    try:
        with p.connection() as conn:
            row = conn.execute("SELECT current_user AS who, current_database() AS db").fetchone()
        assert row == {"who": "pipeline", "db": settings.postgres_db}
    finally:
        p.close()
