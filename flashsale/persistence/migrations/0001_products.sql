-- The catalogue: one row per sale. Live counts (available, reserved, sold) belong to the
-- product's actor and its write-ahead log, not to this table.
CREATE TABLE products (
    id uuid PRIMARY KEY,
    name text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    price_minor bigint NOT NULL CHECK (price_minor >= 0),
    currency char(3) NOT NULL,
    initial_stock integer NOT NULL CHECK (initial_stock >= 0),
    sale_starts_at timestamptz NOT NULL,
    sale_ends_at timestamptz NOT NULL,
    per_user_limit integer NOT NULL CHECK (per_user_limit >= 1),
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK (sale_starts_at < sale_ends_at)
);
