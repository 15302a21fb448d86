//! End-to-end tests: the real `tollgate` binary, a mock provider, real SQLite and Postgres.
//! Postgres is expected at `TOLLGATE_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); `.ci/run` starts it when missing.

mod abuse;
mod admin;
mod budgets;
mod cli;
mod errors;
mod faults;
mod harness;
mod ledger;
mod local_backend;
mod proxy;
mod reload;
mod routing;
mod sdk;
mod security;
mod tls;
mod worst_case;
