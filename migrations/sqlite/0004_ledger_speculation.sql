-- Speculative decoding on local models: the share of drafted tokens the target accepted and
-- the tokens each target forward pass produced (NULL for providers that do not report them).
ALTER TABLE ledger ADD COLUMN spec_acceptance REAL;
ALTER TABLE ledger ADD COLUMN spec_tokens_per_pass REAL;
