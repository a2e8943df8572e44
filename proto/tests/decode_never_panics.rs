//! Decoding arbitrary bytes must yield an error or a value, never a panic.

use escrow_proto::{frame, Message, Publish, Request, Response, MAX_FRAME_LEN};

/// xorshift64*: deterministic, so a failure names its seed and replays.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn exercise(bytes: &[u8]) {
    let _ = frame::decode::<Request>(bytes);
    let _ = frame::decode::<Response>(bytes);
    let mut dec = frame::FrameDecoder::new(MAX_FRAME_LEN);
    dec.extend(bytes);
    while let Ok(Some(payload)) = dec.next_payload() {
        let _ = frame::decode::<Request>(&payload);
    }
}

#[test]
fn random_bytes() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for _ in 0..200_000 {
        let len = (rng.next() % 64) as usize;
        let bytes = rng.bytes(len);
        exercise(&bytes);
    }
}

#[test]
fn mutated_valid_frames() {
    let mut msg = Message::new("id-1", b"body bytes".to_vec());
    msg.key = Some("k".into());
    msg.tags = vec!["a".into(), "b".into()];
    msg.headers.insert("h".into(), "v".into());
    let valid = frame::encode(
        &Request::Publish(Publish {
            topic: "orders".into(),
            producer: None,
            messages: vec![msg.clone(), msg],
            dedupe_by_id: false,
        }),
        MAX_FRAME_LEN,
    )
    .expect("encode");
    let mut rng = Rng(42);
    for _ in 0..100_000 {
        let mut bytes = valid[4..].to_vec();
        for _ in 0..=(rng.next() % 4) {
            let i = (rng.next() as usize) % bytes.len();
            bytes[i] = rng.next() as u8;
        }
        let cut = (rng.next() as usize) % (bytes.len() + 1);
        exercise(&bytes[..cut]);
        exercise(&bytes);
    }
}

#[test]
fn huge_declared_lengths_are_errors() {
    // A varint length of ~4 GiB for the topic string must fail, not allocate.
    let bytes = [4u8, 0xff, 0xff, 0xff, 0xff, 0x0f, b'a'];
    assert!(frame::decode::<Request>(&bytes).is_err());
}
