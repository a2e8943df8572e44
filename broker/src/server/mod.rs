//! The QUIC side: accept loop and per-connection request streams.

pub(crate) mod connection;
pub(crate) mod listener;
