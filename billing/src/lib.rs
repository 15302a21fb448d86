//! Billing: what a request costs and where that is recorded.
//!
//! - [`tokens`] counts prompt and completion tokens the way OpenAI does.
//! - [`price`] turns token counts into integer micro-dollars.
//! - [`ledger`] is the row written once per request, and the background writer that batches rows.
//! - [`rollup`] sums ledger rows per hour and per tenant day for reports.
//! - [`report`] answers usage, routing and chargeback questions from the rollups.
//! - [`store`] is the database (SQLite or Postgres): keys, the ledger, rollups, the audit log.

pub mod budget;
pub mod ledger;
pub mod price;
pub mod report;
pub mod rollup;
pub mod store;
pub mod tokens;
