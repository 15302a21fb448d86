-- The routing decision of requests sent to a complexity route (NULL otherwise), and what the
-- request would have cost on the route's premium model, so savings can be reported exactly.
ALTER TABLE ledger ADD COLUMN route TEXT;
ALTER TABLE ledger ADD COLUMN tier TEXT;
ALTER TABLE ledger ADD COLUMN route_score REAL;
ALTER TABLE ledger ADD COLUMN route_reason TEXT;
ALTER TABLE ledger ADD COLUMN routed_model TEXT;
ALTER TABLE ledger ADD COLUMN premium_equivalent_micros BIGINT;
