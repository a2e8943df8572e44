//! Where clients look when not told: the address and CA of `escrow dev`.

use crate::Trust;
use std::path::{Path, PathBuf};

/// Default client port of `escrow dev` and of clients without `--server`.
pub const DEFAULT_CLIENT_PORT: u16 = 7440;

/// `127.0.0.1:7440`.
pub fn default_server() -> String {
    format!("127.0.0.1:{DEFAULT_CLIENT_PORT}")
}

/// `$ESCROW_HOME`, else `~/.escrow`.
pub fn escrow_home() -> PathBuf {
    if let Some(home) = std::env::var_os("ESCROW_HOME") {
        return PathBuf::from(home);
    }
    std::env::var_os("HOME")
        .map_or_else(|| PathBuf::from("."), PathBuf::from)
        .join(".escrow")
}

/// Where `escrow dev` keeps its data unless told otherwise: `$ESCROW_HOME/dev`.
pub fn default_dev_dir() -> PathBuf {
    escrow_home().join("dev")
}

/// Where `escrow dev` keeps its CA certificate inside a data directory.
pub fn dev_ca_path(data_dir: &Path) -> PathBuf {
    data_dir.join("tls").join("ca.pem")
}

/// Trust from explicit flags, falling back to the default dev CA.
pub fn trust(ca: Option<&Path>, fingerprint: Option<&str>) -> Trust {
    match (fingerprint, ca) {
        (Some(fp), _) => Trust::Fingerprint(fp.to_string()),
        (None, Some(ca)) => Trust::CaFile(ca.to_path_buf()),
        (None, None) => Trust::CaFile(dev_ca_path(&default_dev_dir())),
    }
}
