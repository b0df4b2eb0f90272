-- The indexer's schema, version 3: on-chain deposits (issue 13; ADR 0010;
-- indexer/chain/store.py). Applied once, in one transaction, by indexer/postgres.py.

-- Where the chain watcher of each chain stands: the hashes of the recent blocks it indexed
-- (its reorg window, `{"height": "hash"}`), the highest one, and the node's head it last saw.
CREATE TABLE chain_checkpoints (
    chain_id   bigint PRIMARY KEY,
    blocks     jsonb       NOT NULL,
    indexed_to bigint      NOT NULL,
    head       bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Every deposit the watcher observed, with its latest status:
--   seen       in an indexed block, fewer than the confirmation depth deep;
--   confirmed  deep enough, to be credited;
--   credited   the cluster applied (or already had) the deposit with this `ref`;
--   orphaned   its block left the chain before it was confirmed: never credited;
--   dust       confirmed, but below the asset's exchange precision: nothing to credit.
-- `ref` is the credit's idempotency key in the exchange: chain id, tx hash, log index
-- (`native` for a native transfer). Amounts: `amount` in exchange units, `raw` and `dust` in
-- the chain's units (numeric: up to 78 digits).
CREATE TABLE chain_deposits (
    ref          text        PRIMARY KEY,
    chain_id     bigint      NOT NULL,
    block_number bigint      NOT NULL,
    block_hash   text        NOT NULL,
    tx_hash      text        NOT NULL,
    log_index    integer,
    address      text        NOT NULL,
    account      text        NOT NULL,
    asset        text        NOT NULL,
    amount       bigint      NOT NULL,
    raw          numeric     NOT NULL,
    dust         numeric     NOT NULL,
    status       text        NOT NULL
        CHECK (status IN ('seen', 'confirmed', 'credited', 'orphaned', 'dust')),
    credit_seq   bigint,      -- the exchange event's seq of the credit (null: credited before)
    seen_at      timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX chain_deposits_to_credit ON chain_deposits (chain_id, block_number)
    WHERE status = 'confirmed';
CREATE INDEX chain_deposits_account ON chain_deposits (account);

-- One watcher per chain: the lease, as the indexer's (indexer_lease): held by `holder` (a node
-- id) in `epoch` (raised at every takeover) until `expires_at` on the database's clock. Every
-- write of a watcher checks it in its transaction (FOR SHARE), so a watcher that lost it
-- (paused, partitioned) writes nothing more.
CREATE TABLE chain_leases (
    chain_id    bigint      PRIMARY KEY,
    holder      text        NOT NULL,
    epoch       bigint      NOT NULL,
    expires_at  timestamptz NOT NULL,
    acquired_at timestamptz NOT NULL,
    renewed_at  timestamptz NOT NULL
);
