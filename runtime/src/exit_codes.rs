//! A runner process's exit codes, in a module of their own: the runner and the fork-server
//! template (which exits with them too) both use them, and neither depends on the other for
//! them.

/// The runner stopped cleanly: idle, drained, or released by its parent.
pub const CLEAN: i32 = 0;
/// The boot token was missing or malformed.
pub const BAD_TOKEN: i32 = 2;
/// The parent could not be reached before the connect failsafe.
pub const UNREACHABLE: i32 = 3;
/// The parent refused the runner.
pub const REFUSED: i32 = 4;
/// The connection to the parent was lost.
pub const PARENT_LOST: i32 = 5;
/// The runner could not set itself up (socket, TLS configuration).
pub const SETUP: i32 = 6;
