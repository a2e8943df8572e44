//! openraft's storage conformance suite against the redb log store and state machine.

use escrow_broker::metrics::Metrics;
use escrow_broker::raft::log_store::LogStore;
use escrow_broker::raft::state_machine::StateMachineStore;
use escrow_broker::raft::{StorageError, TypeConfig};
use escrow_broker::state::StateMachine;
use escrow_broker::storage::Store;
use openraft::testing::{StoreBuilder, Suite};
use std::sync::Arc;

struct RedbBuilder;

fn failed(e: impl std::fmt::Display) -> StorageError {
    openraft::StorageIOError::write(openraft::AnyError::error(e)).into()
}

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for RedbBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().map_err(failed)?;
        let metrics = Arc::new(Metrics::default());
        let log = LogStore::open(&dir.path().join("raft-log.redb"), metrics).map_err(failed)?;
        let store = Arc::new(Store::open(&dir.path().join("state.redb")).map_err(failed)?);
        // As a broker wires them: message bodies stay in the log.
        store.attach_log(Arc::new(log.clone()));
        let machine = StateMachine::open(store).map_err(failed)?;
        let sm = StateMachineStore::new(machine)?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_passes_on_redb() {
    Suite::test_all(RedbBuilder).expect("storage suite");
}
