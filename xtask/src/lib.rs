//! The part of xtask that the agent's build script shares: where the
//! project's own toolchain pieces live.

pub mod toolchain;
