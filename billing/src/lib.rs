//! Billing: what a request costs and where that is recorded.
//!
//! - [`tokens`] counts prompt and completion tokens the way OpenAI does.
//! - [`price`] turns token counts into integer micro-dollars.
//! - [`ledger`] is the row written once per request, and the background writer that batches rows.
//! - [`store`] is the database (SQLite or Postgres): keys and the ledger.

pub mod budget;
pub mod ledger;
pub mod price;
pub mod store;
pub mod tokens;
