//! The provider-key domain, shared by the management API and (later) the
//! proxy: ids and records, the state machine, and the vault that seals the
//! material.

pub mod model;
pub mod pool;
pub mod rotate;
pub mod select;
pub mod state;
pub mod vault;

pub use model::{KeyId, KeyRecord, Limits, SealedMaterial};
pub use state::{KeyEvent, KeyState, KeyStatus, transition};
pub use vault::Vault;
