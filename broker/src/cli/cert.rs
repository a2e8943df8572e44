use clap::Subcommand;
use escrow_broker::tls;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub(crate) enum CertCommand {
    /// Create a cluster CA (`ca.pem`, `ca.key`) in DIR, unless one is there.
    Ca {
        /// Directory for the CA files.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a node certificate (`node.pem`, `node.key`) signed by the CA in --ca-dir.
    Node {
        /// Directory holding `ca.pem` and `ca.key` (made by `escrow cert ca`).
        #[arg(long)]
        ca_dir: PathBuf,
        /// Directory for the node's files.
        #[arg(long)]
        out: PathBuf,
        /// Extra DNS names or IP addresses clients use to reach the node (repeatable).
        #[arg(long = "name")]
        names: Vec<String>,
    },
}

pub(crate) fn run(command: CertCommand) -> anyhow::Result<()> {
    match command {
        CertCommand::Ca { dir } => {
            let ca = tls::ensure_ca(&dir)?;
            println!("CA certificate: {}", ca.cert.display());
            println!("CA key:         {} (keep it private)", ca.key.display());
        }
        CertCommand::Node { ca_dir, out, names } => {
            let ca = tls::ensure_ca(&ca_dir)?;
            let (cert, key) = tls::ensure_node_cert(&ca, &out, &names)?;
            println!("node certificate: {}", cert.display());
            println!("node key:         {}", key.display());
        }
    }
    Ok(())
}
