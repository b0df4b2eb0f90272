-- The indexer's schema, version 2: whose history the database holds, and what an operator's
-- move to a restored cluster's history set aside (issue 11; ADR 0007 "Restores";
-- docs/operating/indexer.md "After a restore"). Applied once, in one transaction, by
-- indexer/postgres.py.

-- The cluster (its `cluster_id`, the same on every node; a restore makes a new one) whose
-- committed events the rows are. '': none recorded yet: a fresh database (the first indexer to
-- start records its own) or one an older indexer wrote (the first write records the writer's).
-- An indexer of another cluster never writes here: it raises the alarm (`foreign_timeline`).
ALTER TABLE indexer_checkpoint ADD COLUMN cluster_id text NOT NULL DEFAULT '';

-- Every adoption (`quorumbook indexer adopt`): the database moved from `from_cluster_id`'s
-- history to `to_cluster_id`'s, which equals it up to the restore point (`at_seq`, of log entry
-- `at_raft_index` in the new cluster's log). Rows past it were moved to the *_orphaned tables
-- (tagged with this id), the projections changed since it rolled back to it, the checkpoint
-- set there; `checkpoint_*` and `kafka_seq` say where the old history's checkpoint was.
CREATE TABLE indexer_adoptions (
    id                    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at                    timestamptz NOT NULL DEFAULT now(),
    from_cluster_id       text   NOT NULL,
    to_cluster_id         text   NOT NULL,
    at_seq                bigint NOT NULL,
    at_cmd_index          bigint NOT NULL,
    at_raft_index         bigint NOT NULL,
    checkpoint_seq        bigint NOT NULL,
    checkpoint_cmd_index  bigint NOT NULL,
    checkpoint_raft_index bigint NOT NULL,
    kafka_seq             bigint NOT NULL,
    events_orphaned       bigint NOT NULL DEFAULT 0,
    trades_orphaned       bigint NOT NULL DEFAULT 0,
    orders_orphaned       bigint NOT NULL DEFAULT 0,  -- accepted after the restore point
    orders_rolled_back    bigint NOT NULL DEFAULT 0,  -- open then, changed after it
    balances_rolled_back  bigint NOT NULL DEFAULT 0,
    balances_orphaned     bigint NOT NULL DEFAULT 0,  -- first seen after the restore point
    markets_orphaned      bigint NOT NULL DEFAULT 0,
    resyncs_orphaned      bigint NOT NULL DEFAULT 0
);

-- The old history past the restore point, as the tables held it: every row an adoption took
-- out, and the old version of every row it rolled back, with the cluster it belonged to and the
-- adoption that moved it. Nothing reads them but people: the live tables hold one history.
CREATE TABLE events_orphaned (adoption_id bigint NOT NULL, cluster_id text NOT NULL, LIKE events);
CREATE INDEX events_orphaned_seq ON events_orphaned (adoption_id, seq);
CREATE TABLE trades_orphaned (adoption_id bigint NOT NULL, cluster_id text NOT NULL, LIKE trades);
CREATE TABLE orders_orphaned (adoption_id bigint NOT NULL, cluster_id text NOT NULL, LIKE orders);
CREATE TABLE balances_orphaned (
    adoption_id bigint NOT NULL, cluster_id text NOT NULL, LIKE balances
);
CREATE TABLE markets_orphaned (adoption_id bigint NOT NULL, cluster_id text NOT NULL, LIKE markets);

-- A resync of the old history past the restore point describes rows that are now orphaned: it
-- names the adoption, and a later adoption does not count it.
ALTER TABLE indexer_resyncs ADD COLUMN orphaned_by bigint;
