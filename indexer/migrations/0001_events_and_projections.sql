-- The indexer's schema, version 1 (docs/reference/indexer-postgres.md says what each table
-- and column means to a consumer). Applied once, in one transaction, by indexer/postgres.py.
--
-- Units are the state machine's: quantities in lots, prices in quote minor units per lot,
-- amounts in minor units, `ts` in nanoseconds (the leader's clock stamped into the command),
-- all bigint (every value fits: docs/reference/state-machine.md "Limits").

-- Every event, exactly once, in `seq` order: the source of truth the projections are built
-- from. `body` is the event exactly as the state machine emitted it (seq, ts, cmd_index
-- included); the other columns are copies for indexing.
CREATE TABLE events (
    seq       bigint PRIMARY KEY,
    cmd_index bigint NOT NULL,
    ts        bigint NOT NULL,
    type      text   NOT NULL,
    market    text,             -- null for events without one (balance, rejected)
    account   text,             -- the account the event is about; null for trade (two) and book
    order_id  bigint,           -- accepted, cancelled, amended, filled, rejected (a duplicate)
    body      jsonb  NOT NULL
);
CREATE INDEX events_market_seq ON events (market, seq) WHERE market IS NOT NULL;
CREATE INDEX events_account_seq ON events (account, seq) WHERE account IS NOT NULL;
CREATE INDEX events_order_id ON events (order_id) WHERE order_id IS NOT NULL;
-- cmd_index and ts only grow along seq: a BRIN index is tiny and costs the writer ~nothing.
CREATE INDEX events_cmd_index ON events USING brin (cmd_index);
CREATE INDEX events_ts ON events USING brin (ts);

-- Markets (market_created), for reading quantities and prices: lot_size, tick_size, fees.
CREATE TABLE markets (
    market        text   PRIMARY KEY,
    base          text   NOT NULL,
    quote         text   NOT NULL,
    lot_size      bigint NOT NULL,
    tick_size     bigint NOT NULL,
    maker_fee_bps bigint NOT NULL,
    taker_fee_bps bigint NOT NULL,
    created_seq   bigint            -- null: known from a resync's snapshot
);

-- Every accepted order and where it stands. `qty` is always filled_qty + remaining: the
-- order's size (the accepted qty; an amend to a new remaining qty changes it, as in the
-- engine). A cancelled order keeps the remaining it had when cancelled.
CREATE TABLE orders (
    order_id        bigint PRIMARY KEY,
    account         text   NOT NULL,
    market          text   NOT NULL,
    side            text   NOT NULL CHECK (side IN ('buy', 'sell')),
    order_type      text   NOT NULL CHECK (order_type IN ('limit', 'market')),
    price           bigint,     -- null for a market order
    qty             bigint GENERATED ALWAYS AS (filled_qty + remaining) STORED,
    placed_qty      bigint,     -- qty when accepted; null for an order known from a resync
    remaining       bigint NOT NULL CHECK (remaining >= 0),
    filled_qty      bigint NOT NULL CHECK (filled_qty >= 0),
    status          text   NOT NULL CHECK (status IN ('open', 'filled', 'cancelled', 'unknown')),
    cancel_reason   text,       -- for cancelled: user, cancel_all, ioc, stp, funds
    client_order_id text,
    tif             text   NOT NULL,
    stp             text   NOT NULL,
    created_seq     bigint,     -- the accepted event; null for an order known from a resync
    created_ts      bigint,
    updated_seq     bigint NOT NULL,  -- the last event (or resync) that changed this row
    updated_ts      bigint NOT NULL
);
CREATE INDEX orders_account_status ON orders (account, status, order_id);
CREATE INDEX orders_open_by_market ON orders (market, side, price) WHERE status = 'open';
CREATE INDEX orders_client_order_id ON orders (account, client_order_id)
    WHERE client_order_id IS NOT NULL;

-- Every trade (one per maker fill). Fees are in the market's quote asset.
CREATE TABLE trades (
    trade_id       bigint PRIMARY KEY,
    seq            bigint NOT NULL UNIQUE,
    cmd_index      bigint NOT NULL,
    ts             bigint NOT NULL,
    market         text   NOT NULL,
    price          bigint NOT NULL,
    qty            bigint NOT NULL,
    maker_order_id bigint NOT NULL,
    taker_order_id bigint NOT NULL,
    maker_account  text   NOT NULL,
    taker_account  text   NOT NULL,
    taker_side     text   NOT NULL CHECK (taker_side IN ('buy', 'sell')),
    maker_fee      bigint NOT NULL,
    taker_fee      bigint NOT NULL
);
CREATE INDEX trades_market_seq ON trades (market, seq);
CREATE INDEX trades_maker_account_seq ON trades (maker_account, seq);
CREATE INDEX trades_taker_account_seq ON trades (taker_account, seq);
CREATE INDEX trades_maker_order_id ON trades (maker_order_id);
CREATE INDEX trades_taker_order_id ON trades (taker_order_id);

-- What each account holds of each asset (the last balance event; zero rows stay).
CREATE TABLE balances (
    account     text   NOT NULL,
    asset       text   NOT NULL,
    available   bigint NOT NULL CHECK (available >= 0),
    reserved    bigint NOT NULL CHECK (reserved >= 0),
    updated_seq bigint NOT NULL,
    updated_ts  bigint NOT NULL,
    PRIMARY KEY (account, asset)
) WITH (fillfactor = 80);  -- room for HOT updates: a balance changes far more than it is added
CREATE INDEX balances_asset ON balances (asset);

-- How far the indexer got: one row. `seq`: the last event written (with the projections);
-- `cmd_index` / `raft_index`: of the last log entry whose events are all in; `kafka_seq`: the
-- last event Kafka acknowledged; `epoch`: the lease epoch of the last writer.
CREATE TABLE indexer_checkpoint (
    one        boolean PRIMARY KEY DEFAULT true CHECK (one),
    seq        bigint  NOT NULL,
    cmd_index  bigint  NOT NULL,
    raft_index bigint  NOT NULL,
    kafka_seq  bigint  NOT NULL CHECK (kafka_seq <= seq),
    epoch      bigint  NOT NULL,
    updated_at timestamptz NOT NULL
);
INSERT INTO indexer_checkpoint VALUES (true, 0, 0, 0, 0, 0, now());

-- The right to stream: one row. Expiry is on the database's clock, never a node's. `epoch`
-- goes up at every takeover; writes name it (fencing). `holder` stays after a release (which
-- sets expires_at to -infinity) for the record.
CREATE TABLE indexer_lease (
    one         boolean PRIMARY KEY DEFAULT true CHECK (one),
    holder      text,
    epoch       bigint      NOT NULL,
    expires_at  timestamptz NOT NULL,
    acquired_at timestamptz,
    renewed_at  timestamptz
);
INSERT INTO indexer_lease VALUES (true, NULL, 0, '-infinity', NULL, NULL);

-- Every resync: the projections rebuilt from a snapshot, and the events they skipped
-- (skipped_from_seq .. skipped_to_seq; empty when from > to), which the events table lacks.
CREATE TABLE indexer_resyncs (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at                timestamptz NOT NULL DEFAULT now(),
    holder            text   NOT NULL,
    epoch             bigint NOT NULL,
    skipped_from_seq  bigint NOT NULL,
    skipped_to_seq    bigint NOT NULL,
    from_cmd_index    bigint NOT NULL,  -- the checkpoint's before
    to_cmd_index      bigint NOT NULL,  -- the snapshot's
    to_raft_index     bigint NOT NULL,
    state_hash        text   NOT NULL,  -- the snapshot's Exchange.state_hash()
    open_orders       bigint NOT NULL,  -- rows the snapshot gave
    balances          bigint NOT NULL,
    orders_unknown    bigint NOT NULL,  -- open orders that left the book in the skipped range
    request_id        bigint            -- the operator's request it served
);

-- An operator's request for a resync (`quorumbook indexer resync`): a follower that raised
-- the alarm serves it, from its own snapshot, under the lease, and streams on from there.
-- One row; `id` goes up at each request, `done_id` names the last one served or withdrawn.
-- A request not served within `expires_at` (the operator's command gave up) is void.
CREATE TABLE indexer_resync_request (
    one          boolean PRIMARY KEY DEFAULT true CHECK (one),
    id           bigint      NOT NULL,
    done_id      bigint      NOT NULL,
    requested_by text,
    requested_at timestamptz,
    expires_at   timestamptz NOT NULL
);
INSERT INTO indexer_resync_request VALUES (true, 0, 0, NULL, NULL, '-infinity');
