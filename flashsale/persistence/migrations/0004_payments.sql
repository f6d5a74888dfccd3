-- One payment session per order, created on the first visit of its payment link.
CREATE TABLE payment_sessions (
    order_id uuid PRIMARY KEY,
    provider text NOT NULL,
    session_id text NOT NULL,
    checkout_url text,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Set once the provider's session is closed because the order's hold lapsed.
    expired_at timestamptz
);

-- Every webhook delivery that passed its signature check, for audit and debugging (payload
-- bounded). outcome is NULL until processed, so a redelivery after a failure is processed again.
CREATE TABLE webhook_events (
    provider text NOT NULL,
    event_id text NOT NULL,
    payload bytea NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    outcome text,
    PRIMARY KEY (provider, event_id)
);

-- Refund calls to the gateway. The intent itself is journaled in the WAL (refund_status
-- 'pending'); this row only paces retries and remembers that the gateway accepted.
CREATE TABLE refund_attempts (
    order_id uuid PRIMARY KEY,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    accepted_at timestamptz,
    last_error text
);
