CREATE TABLE IF NOT EXISTS products (
    id uuid PRIMARY KEY,
    price_minor bigint NOT NULL,
    currency char(3) NOT NULL,
    stock integer NOT NULL,
    available integer NOT NULL CHECK (available >= 0),
    reserved integer NOT NULL DEFAULT 0,
    sold integer NOT NULL DEFAULT 0,
    sale_starts_at timestamptz NOT NULL,
    sale_ends_at timestamptz NOT NULL,
    per_user_limit integer NOT NULL
);
CREATE TABLE IF NOT EXISTS orders (
    id uuid PRIMARY KEY,
    product_id uuid NOT NULL REFERENCES products (id),
    user_id uuid NOT NULL,
    idempotency_key text NOT NULL,
    quantity integer NOT NULL,
    unit_price_minor bigint NOT NULL,
    status text NOT NULL,
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, idempotency_key)
);
CREATE INDEX IF NOT EXISTS orders_by_product_user ON orders (product_id, user_id);
