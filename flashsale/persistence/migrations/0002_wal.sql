-- The write-ahead log. A row holds one group-committed batch of one product's events, numbered
-- first_seq..last_seq. `record` is a frame: 4-byte length, 4-byte CRC-32, msgpack events, so a
-- torn or corrupted record is detected on replay instead of being applied.
CREATE TABLE wal (
    product_id uuid NOT NULL,
    first_seq bigint NOT NULL CHECK (first_seq >= 1),
    last_seq bigint NOT NULL CHECK (last_seq >= first_seq),
    record bytea NOT NULL,
    PRIMARY KEY (product_id, first_seq)
);

-- The product's whole state after event `seq`, framed like a WAL record. Recovery starts from
-- the newest one and folds the WAL after it.
CREATE TABLE snapshots (
    product_id uuid NOT NULL,
    seq bigint NOT NULL,
    record bytea NOT NULL,
    PRIMARY KEY (product_id, seq)
);

-- The orders read model, written in the same transaction as the WAL rows that change it, so an
-- acknowledged order is readable at once. The WAL stays the source of truth. Times are Unix epoch
-- milliseconds, as the WAL records them; ids are time-ordered (UUIDv7), so id order is age order.
CREATE TABLE orders (
    id uuid PRIMARY KEY,
    product_id uuid NOT NULL,
    user_id uuid NOT NULL,
    idempotency_key text NOT NULL,
    quantity integer NOT NULL,
    unit_price_minor bigint NOT NULL,
    currency char(3) NOT NULL,
    status text NOT NULL,
    payment_id text,
    refund_status text NOT NULL,
    refund_amount_minor bigint NOT NULL,
    expires_at_ms bigint NOT NULL,
    confirmed_at_ms bigint,
    created_at_ms bigint NOT NULL,
    updated_at_ms bigint NOT NULL
);
-- Keys are scoped to the user across products; this also serves a user's order list.
CREATE UNIQUE INDEX orders_by_user_key ON orders (user_id, idempotency_key);
