//! Bad input gets a clear error with a stable code, and the node keeps serving (G8).

use escrow_client::wire::read_frame;
use escrow_client::{ClientError, Connection};
use escrow_proto::{
    frame, CreateTopic, ErrorCode, Message, Publish, Request, Response, MAX_BODY_LEN, MAX_FRAME_LEN,
};
use escrow_tests::TestNode;

/// Sends raw bytes on a fresh stream of `conn` and returns the server's answer.
async fn raw(conn: &Connection, bytes: &[u8]) -> anyhow::Result<Response> {
    let (mut send, mut recv) = conn.quic().open_bi().await?;
    send.write_all(bytes).await?;
    let _ = send.finish();
    Ok(read_frame(&mut recv, MAX_FRAME_LEN).await?)
}

fn code(response: &Response) -> Option<ErrorCode> {
    match response {
        Response::Error(e) => Some(e.code),
        _ => None,
    }
}

async fn still_serving(node: &TestNode) -> anyhow::Result<()> {
    let fresh = Connection::connect(&node.client()).await?;
    anyhow::ensure!(matches!(
        fresh.request(&Request::ListTopics).await?,
        Response::Topics(_)
    ));
    Ok(())
}

#[tokio::test]
async fn garbage_oversized_and_unknown_get_clear_errors() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let conn = Connection::connect(&node.client()).await?;

    // Garbage: a plausible small length followed by junk.
    let mut garbage = 12u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[
        0xde, 0xad, 0xbe, 0xef, 0xff, 0xff, 0xff, 0xff, 0x0f, 1, 2, 3,
    ]);
    assert_eq!(
        code(&raw(&conn, &garbage).await?),
        Some(ErrorCode::MALFORMED)
    );

    // Text on the wire (an HTTP request): its first bytes read as a ~1 GiB length.
    assert_eq!(
        code(&raw(&conn, b"GET / HTTP/1.1\r\n\r\n").await?),
        Some(ErrorCode::FRAME_TOO_LARGE)
    );

    // A declared length over the limit is refused before the payload is read.
    let mut huge = (MAX_FRAME_LEN + 1).to_be_bytes().to_vec();
    huge.extend_from_slice(&[0u8; 1024]);
    assert_eq!(
        code(&raw(&conn, &huge).await?),
        Some(ErrorCode::FRAME_TOO_LARGE)
    );

    // A stream that ends mid-frame.
    assert_eq!(
        code(&raw(&conn, &[0, 0]).await?),
        Some(ErrorCode::MALFORMED)
    );
    assert_eq!(
        code(&raw(&conn, &[0, 0, 0, 9, 1]).await?),
        Some(ErrorCode::MALFORMED)
    );

    // The same connection still works after all of that.
    assert!(matches!(
        conn.request(&Request::ListTopics).await?,
        Response::Topics(_)
    ));

    // Unknown topic.
    let err = conn
        .request(&Request::Publish(Publish {
            topic: "nope".into(),
            producer: None,
            messages: vec![Message::new("a", b"x".to_vec())],
            dedupe_by_id: false,
        }))
        .await
        .expect_err("unknown topic");
    assert_eq!(err.code(), Some(ErrorCode::UNKNOWN_TOPIC));

    // Oversized message (sent by hand, bypassing the producer's own check).
    conn.request(&Request::CreateTopic(CreateTopic {
        topic: "t".into(),
        queues: 1,
    }))
    .await?;
    let err = conn
        .request(&Request::Publish(Publish {
            topic: "t".into(),
            producer: None,
            messages: vec![Message::new("a", vec![0u8; MAX_BODY_LEN + 1])],
            dedupe_by_id: false,
        }))
        .await
        .expect_err("too large");
    assert_eq!(err.code(), Some(ErrorCode::MESSAGE_TOO_LARGE));

    // Bad names and arguments.
    let err = conn
        .request(&Request::CreateTopic(CreateTopic {
            topic: "bad name!".into(),
            queues: 1,
        }))
        .await
        .expect_err("bad name");
    assert_eq!(err.code(), Some(ErrorCode::INVALID_ARGUMENT));
    let err = conn
        .request(&Request::CreateTopic(CreateTopic {
            topic: "t".into(),
            queues: 1,
        }))
        .await
        .expect_err("exists");
    assert_eq!(err.code(), Some(ErrorCode::TOPIC_EXISTS));

    // Nothing was stored by any of the refused requests.
    match conn
        .request(&Request::DescribeTopic { topic: "t".into() })
        .await?
    {
        Response::Topic(t) => assert_eq!(t.queues[0].next_offset, 0),
        other => anyhow::bail!("unexpected {other:?}"),
    }
    still_serving(&node).await
}

#[tokio::test]
async fn requests_before_the_handshake_are_refused() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    // A raw QUIC connection that skips Hello.
    let config = node.client();
    let tls = escrow_client::tls::client_config(&config.trust, escrow_proto::ALPN_CLIENT)?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    client.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(quic)));
    let raw_conn = client.connect(node.addr().parse()?, "localhost")?.await?;
    let (mut send, mut recv) = raw_conn.open_bi().await?;
    send.write_all(&frame::encode(&Request::ListTopics, MAX_FRAME_LEN)?)
        .await?;
    send.finish()?;
    let response: Response = read_frame(&mut recv, MAX_FRAME_LEN).await?;
    assert_eq!(code(&response), Some(ErrorCode::HANDSHAKE_REQUIRED));
    still_serving(&node).await
}

#[tokio::test]
async fn wrong_certificate_is_refused() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let other = TestNode::start().await?;
    // Trust the other node's CA: the handshake must fail.
    let mut config = other.client();
    config.server = node.addr();
    let err = Connection::connect(&config).await.expect_err("untrusted");
    assert!(matches!(err, ClientError::Connection { .. }), "{err}");
    still_serving(&node).await
}
