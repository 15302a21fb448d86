//! The gateway as a library. The `tollgate` binary (`main.rs`) is [`cli::run`]; the fuzz targets
//! (`tests/fuzz/`) reach the parsers of untrusted input through [`proxy`] and [`config`].

mod abandoned;
mod admin;
pub mod cli;
pub mod config;
mod keys;
mod limits;
pub mod proxy;
mod reload;
mod router_eval;
mod routing;
mod serve;
mod shutdown;
mod tls;
