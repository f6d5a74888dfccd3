-- Rate-limit windows shared by the front ends of `flashsale serve --workers N` (SPEC §8: limits
-- hold across front-end processes). One row per limit and key: the window it counts and the
-- requests in it. Unlogged: counters need not survive a database crash, and skipping the
-- write-ahead log makes each request's upsert cheaper.
CREATE UNLOGGED TABLE rate_counts (
    kind text NOT NULL,
    key text NOT NULL,
    window_no bigint NOT NULL,
    count integer NOT NULL,
    PRIMARY KEY (kind, key)
);
