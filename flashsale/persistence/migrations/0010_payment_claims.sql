-- A payment id belongs to the first order a webhook claimed it for. Webhooks claim it here
-- before the order's product decides: orders_by_payment is only checked at the product's
-- commit, so two webhooks carrying one payment id for orders on two products used to pass
-- both, and the second commit failed, failing every command in its batch.
CREATE TABLE payment_claims (
    payment_id text PRIMARY KEY,
    order_id uuid NOT NULL
);
INSERT INTO payment_claims SELECT payment_id, id FROM orders WHERE payment_id IS NOT NULL;
