//! The test-only echo endpoint. A normal build has no `/echo`; with
//! `--features test-echo` it upgrades without a token into a session that
//! sends every message back through the production reader, outbox and writer
//! (`scripts/autobahn.sh` runs the Autobahn testsuite against it).

mod common;

use common::*;

#[cfg(not(feature = "test-echo"))]
#[tokio::test]
async fn a_normal_build_has_no_echo_endpoint() {
    let node = TestNode::start().await;
    let upgrade = [
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("sec-websocket-version", "13"),
    ];
    let (status, body) = http(node.addr, "GET", "/echo", &upgrade, String::new()).await;
    assert_eq!(status, 404, "{body}");
}

#[cfg(feature = "test-echo")]
#[tokio::test]
async fn echo_sends_every_message_back_as_it_came() {
    let node = TestNode::start().await;
    let mut raw = RawClient::connect(node.addr, "/echo").await;
    // No welcome: the first frame back is the first echo.
    raw.send_frame(true, 0x1, "héllo".as_bytes(), true).await;
    assert_eq!(
        raw.read_frame().await,
        Some((0x1, "héllo".as_bytes().to_vec()))
    );
    // A fragmented binary message with a ping in the middle.
    raw.send_frame(false, 0x2, &[0xff, 0x00], true).await;
    raw.send_frame(true, 0x9, b"are you there", true).await;
    raw.send_frame(true, 0x0, &[0x01], true).await;
    assert_eq!(
        raw.read_frame().await,
        Some((0xA, b"are you there".to_vec()))
    );
    assert_eq!(raw.read_frame().await, Some((0x2, vec![0xff, 0x00, 0x01])));
    // Larger than a read chunk, within limits.max_message_bytes.
    let large = vec![b'x'; 60_000];
    raw.send_frame(true, 0x1, &large, true).await;
    let (opcode, payload) = raw.read_frame().await.expect("the echo");
    assert!(
        opcode == 0x1 && payload == large,
        "opcode {opcode}, {} bytes",
        payload.len()
    );
    // The client's close is echoed.
    raw.send_frame(true, 0x8, &[0x03, 0xe8, b'b', b'y', b'e'], true)
        .await;
    assert_eq!(
        raw.read_frame().await,
        Some((0x8, vec![0x03, 0xe8, b'b', b'y', b'e']))
    );
}
