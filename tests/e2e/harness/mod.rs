//! Shared pieces of the end-to-end tests: a mock provider and the real gateway process.

pub mod gateway;
pub mod mock_upstream;

pub use gateway::{policy, Gateway};
pub use mock_upstream::MockUpstream;
