-- A new order has no refund: its row is written with the columns an order placement sets, and
-- these take their values from here (payment_id and confirmed_at_ms are NULL already).
ALTER TABLE orders ALTER COLUMN refund_status SET DEFAULT 'none',
                   ALTER COLUMN refund_amount_minor SET DEFAULT 0;
