//! Escrow outbox and inbox: local message tables (eBay's pattern, Pritchett's
//! *BASE: An ACID Alternative*) with a relay that publishes pending rows to the broker.
//!
//! Not implemented yet: this crate is a placeholder so the workspace layout is
//! final. Its issue adds the redb and PostgreSQL stores, the relay (in-process and
//! the `escrow-relay` sidecar) and the inbox. Nothing here may be used as if it worked.
