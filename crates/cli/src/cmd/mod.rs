//! One file per command, as `quorum <command>` names them.

pub mod advise;
pub mod evaluate;
pub mod node;
pub mod plot;
pub mod ps;
pub mod sim;
pub mod train;
pub mod worker;
