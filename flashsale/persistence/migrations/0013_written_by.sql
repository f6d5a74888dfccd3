-- Front ends read only the sales and counts written since their last read. Each row records the
-- transaction that last wrote it, and a reader remembers its horizon: the oldest transaction
-- still running when it read. Rows written by that transaction or a later one are read again,
-- so a commit in flight during a read is never missed. No index: a sale's counts row is written
-- in every commit of its log, and an index on this column would take those updates off
-- PostgreSQL's cheaper (HOT) path.
ALTER TABLE products ADD COLUMN written_by xid8 NOT NULL DEFAULT pg_current_xact_id();
ALTER TABLE product_counts ADD COLUMN written_by xid8 NOT NULL DEFAULT pg_current_xact_id();
