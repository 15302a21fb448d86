//! Shared pieces of the end-to-end tests: a mock provider and the real gateway process.

pub mod fault_upstream;
pub mod gateway;
pub mod load;
pub mod mock_upstream;
pub mod process;
pub mod report;
pub mod secrets;
pub mod stores;

pub use gateway::{policy, Gateway};
pub use mock_upstream::MockUpstream;
