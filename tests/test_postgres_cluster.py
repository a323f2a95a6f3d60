"""The throwaway PostgreSQL cluster the ingest tests will run against (devtools/postgres.py):
made with initdb as an unprivileged user, on loopback, committed data surviving a crash."""

from __future__ import annotations

import os

from devtools.postgres import Postgres


def test_a_cluster_starts_keeps_committed_rows_across_a_crash_and_is_removed() -> None:
    pg = Postgres().start()
    try:
        assert pg.psql("SELECT 1").strip() == "1"
        assert pg.psql("SHOW listen_addresses").strip() == "127.0.0.1"
        pg.psql("CREATE TABLE t (k int PRIMARY KEY); INSERT INTO t VALUES (1), (2)")
        pg.kill()
        pg.start()
        assert pg.psql("SELECT count(*) FROM t").strip() == "2"
        assert pg.psql("SELECT current_user").strip() == "ebike"
    finally:
        pg.remove()
    assert not os.path.exists(pg.workdir)
