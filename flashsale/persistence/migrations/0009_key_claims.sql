-- An idempotency key belongs to the product it was first sent to. The front end claims a
-- batch's keys here before the batch reaches the product's actor: each actor sees only its own
-- orders, so one key sent to two products at the same instant used to pass both, and the
-- second commit then failed on orders_by_user_key, failing every order in that batch.
CREATE TABLE key_claims (
    user_id uuid NOT NULL,
    idempotency_key text NOT NULL,
    product_id uuid NOT NULL,
    PRIMARY KEY (user_id, idempotency_key)
);
INSERT INTO key_claims SELECT user_id, idempotency_key, product_id FROM orders;
