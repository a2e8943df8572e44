//! One QUIC connection to a broker node, with the handshake done.

use crate::tls::{client_config, Trust};
use crate::wire::{read_frame, write_frame, StreamError};
use crate::ClientError;
use escrow_proto::{
    Hello, HelloOk, Request, Response, ALPN_CLIENT, MAX_FRAME_LEN, PROTOCOL_VERSION,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `host:port` of a broker node; for a [`crate::Client`], a comma-separated list of seeds.
    pub server: String,
    /// How to trust its certificate.
    pub trust: Trust,
    /// Name checked against the certificate; defaults to the host part of `server`.
    pub server_name: Option<String>,
    /// Sent in the handshake, shown in server logs.
    pub client_name: String,
    /// Authentication token, when the server requires one.
    pub token: Option<String>,
    /// Bound on each request (a receive's long-poll wait is added to it).
    pub request_timeout: Duration,
    /// How long a [`crate::Client`] keeps retrying through leader changes and failures.
    pub failover_timeout: Duration,
}

impl ClientConfig {
    /// A configuration with default timeouts.
    pub fn new(server: impl Into<String>, trust: Trust) -> Self {
        ClientConfig {
            server: server.into(),
            trust,
            server_name: None,
            client_name: "escrow-client".into(),
            token: None,
            request_timeout: Duration::from_secs(10),
            failover_timeout: Duration::from_secs(20),
        }
    }
}

/// A connection to one broker node, ready for requests.
///
/// Cheap to clone; every request runs on its own bidirectional stream, so many
/// requests can be in flight at once (pipelining).
#[derive(Clone, Debug)]
pub struct Connection {
    inner: quinn::Connection,
    server: Arc<str>,
    hello: Arc<HelloOk>,
    request_timeout: Duration,
    // Held so the endpoint's socket lives as long as any clone of the connection.
    _endpoint: quinn::Endpoint,
}

fn host_of(server: &str) -> &str {
    // "[::1]:7440" -> "::1"; "localhost:7440" -> "localhost"
    let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

impl Connection {
    /// Connects, verifies the server certificate and performs the version handshake.
    pub async fn connect(config: &ClientConfig) -> Result<Connection, ClientError> {
        let conn_err = |reason: String| ClientError::Connection {
            addr: config.server.clone(),
            reason,
        };
        let addr: SocketAddr = tokio::net::lookup_host(&config.server)
            .await
            .map_err(|e| conn_err(format!("resolving: {e}")))?
            .next()
            .ok_or_else(|| conn_err("address resolved to nothing".into()))?;
        let tls = client_config(&config.trust, ALPN_CLIENT)?;
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(quic));
        client_config.transport_config(Arc::new(transport_config()));
        let bind: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint = endpoint(bind, None).map_err(|e| conn_err(format!("binding: {e}")))?;
        endpoint.set_default_client_config(client_config);
        let name = config
            .server_name
            .clone()
            .unwrap_or_else(|| host_of(&config.server).to_string());
        let connecting = endpoint
            .connect(addr, &name)
            .map_err(|e| conn_err(e.to_string()))?;
        let inner = tokio::time::timeout(config.request_timeout, connecting)
            .await
            .map_err(|_| conn_err("handshake timed out".into()))?
            .map_err(|e| conn_err(e.to_string()))?;
        let mut conn = Connection {
            inner,
            server: config.server.as_str().into(),
            hello: Arc::new(HelloOk {
                protocol_version: PROTOCOL_VERSION,
                node_id: 0,
                max_frame_len: MAX_FRAME_LEN,
            }),
            request_timeout: config.request_timeout,
            _endpoint: endpoint,
        };
        let hello = Request::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            client_name: config.client_name.clone(),
            token: config.token.clone(),
        });
        match conn.request(&hello).await? {
            Response::HelloOk(ok) => conn.hello = Arc::new(ok),
            other => return Err(unexpected("hello", &other)),
        }
        Ok(conn)
    }

    /// The server's handshake answer.
    pub fn server_info(&self) -> &HelloOk {
        &self.hello
    }

    /// The address this connection was made to.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Sends one request on a new stream and waits for its response.
    ///
    /// An error response becomes [`ClientError::Server`].
    pub async fn request(&self, request: &Request) -> Result<Response, ClientError> {
        let extra = match request {
            Request::Receive(r) => Duration::from_millis(r.wait_ms),
            _ => Duration::ZERO,
        };
        let kind = request.kind();
        let response = tokio::time::timeout(self.request_timeout + extra, self.exchange(request))
            .await
            .map_err(|_| ClientError::Timeout(kind))??;
        match response {
            Response::Error(e) => Err(ClientError::Server(e)),
            other => Ok(other),
        }
    }

    async fn exchange(&self, request: &Request) -> Result<Response, ClientError> {
        let max = self.hello.max_frame_len.min(MAX_FRAME_LEN);
        let (mut send, mut recv) = self.inner.open_bi().await.map_err(|e| self.broken(e))?;
        write_frame(&mut send, request, max)
            .await
            .map_err(|e| self.stream_error(e))?;
        read_frame(&mut recv, MAX_FRAME_LEN)
            .await
            .map_err(|e| self.stream_error(e))
    }

    fn broken(&self, e: impl std::fmt::Display) -> ClientError {
        ClientError::Connection {
            addr: self.server.to_string(),
            reason: e.to_string(),
        }
    }

    fn stream_error(&self, e: StreamError) -> ClientError {
        match e {
            StreamError::Frame(f) => ClientError::Protocol(f),
            StreamError::Io(io) => self.broken(io),
        }
    }

    /// Closes the connection; requests in flight fail.
    pub fn close(&self) {
        self.inner.close(0u32.into(), b"bye");
    }

    /// The underlying QUIC connection (for server-initiated streams).
    pub fn quic(&self) -> &quinn::Connection {
        &self.inner
    }
}

/// Receive buffer asked for each endpoint's UDP socket.
const SOCKET_RECV_BUFFER: usize = 4 * 1024 * 1024;

/// Largest UDP payload an endpoint accepts and MTU discovery may probe up to. Paths
/// start at QUIC's safe 1200 bytes and discovery raises the size only as far as the
/// path carries probes: 1452 on Ethernet, this bound on loopback or jumbo frames. Each
/// packet costs a fixed amount of work (header protection, ACK tracking, its share of a
/// syscall), so a replication batch costs less in fewer, larger packets. The bound keeps
/// quinn's send batch (ten packets, one GSO send) under the 64 KiB a UDP send can carry:
/// at 16 KiB those sends failed, and the loss stalled replication into timeouts.
/// quinn sizes each endpoint's receive buffer from this value (allocated untouched).
pub const MAX_UDP_PAYLOAD: u16 = 6_400;

/// A QUIC endpoint on `addr` with a large socket receive buffer; a server when `server`
/// is given.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(addr)?;
    // The default (~200 KiB) overflows under bursts of replication traffic; each drop
    // costs a QUIC loss recovery and a halved congestion window. The kernel caps the
    // request at net.core.rmem_max.
    let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(SOCKET_RECV_BUFFER);
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    quinn::Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime))
}

/// Transport settings shared by clients: enough concurrent streams for deep pipelining.
pub fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(1024u32.into());
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(30))
            .unwrap_or(quinn::IdleTimeout::from(quinn::VarInt::from_u32(30_000))),
    ));
    // Large windows so a window of 256 in-flight 1 KiB publishes is never flow-control bound.
    transport.stream_receive_window((8u32 * 1024 * 1024).into());
    transport.receive_window((64u32 * 1024 * 1024).into());
    transport.send_window(64 * 1024 * 1024);
    transport.mtu_discovery_config(Some(mtu_discovery()));
    transport
}

/// MTU discovery up to [`MAX_UDP_PAYLOAD`] (quinn stops at 1452 by default).
pub fn mtu_discovery() -> quinn::MtuDiscoveryConfig {
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    mtu
}

/// A [`ClientError::UnexpectedResponse`] for `request`.
pub fn unexpected(request: &'static str, response: &Response) -> ClientError {
    let mut text = format!("{response:?}");
    text.truncate(120);
    ClientError::UnexpectedResponse {
        request,
        response: text,
    }
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn host_part() {
        assert_eq!(host_of("127.0.0.1:7440"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7440"), "::1");
        assert_eq!(host_of("localhost:1"), "localhost");
    }
}
