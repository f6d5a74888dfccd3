-- A payment id belongs to at most one order. A product's actor checks this only among the
-- orders in its memory, so the read model holds the rule across products and across orders a
-- product has forgotten; webhooks look up the order holding a payment id through this index.
CREATE UNIQUE INDEX orders_by_payment ON orders (payment_id) WHERE payment_id IS NOT NULL;
