-- The tenant's free-form tags (team, project, cost center) at the time of the request, as a JSON
-- object, so chargeback groups by what was true then.
ALTER TABLE ledger ADD COLUMN tags TEXT;
