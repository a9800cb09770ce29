//! The `tern` binary's library: configuration, the standalone assembly of
//! every role, and the terminal chat client. `main.rs` only parses the
//! command line, sets up logging and waits for signals.

pub mod chat;
pub mod cluster;
pub mod config;
pub mod standalone;
