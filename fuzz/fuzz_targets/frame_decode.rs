//! Arbitrary bytes as a data stream: decode every frame the input holds, open every DATA chunk
//! (decompress within raw_len, check the BLAKE3 of the prefix) and check the receiver's sequencing and FIN
//! checks. Nothing may panic, decode may consume at most the input, and every accepted frame
//! must re-encode to exactly the bytes it was decoded from (decoding is canonical).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgferry_common::frame::{self, ChunkDecoder, DirectionStats, Frame, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    // Feed the input in two pieces, like a stream arriving in reads; the first byte picks the cut.
    let cut = data.first().map_or(0, |&b| b as usize * data.len() / 256);
    let mut buf = BytesMut::from(&data[..cut]);
    let mut rest = &data[cut..];
    let mut consumed = 0usize;
    let mut decoder = ChunkDecoder::new();
    let mut stats = DirectionStats::default();
    loop {
        let before = buf.len();
        match frame::decode(&mut buf) {
            Ok(Some(f)) => {
                let used = before - buf.len();
                assert!(used >= HEADER_LEN && used == f.encoded_len());
                let mut re = BytesMut::new();
                f.encode(&mut re);
                assert_eq!(&re[..], &data[consumed..consumed + used]);
                consumed += used;
                match &f {
                    Frame::Data(chunk) => {
                        if let Ok(raw) = decoder.decompress(chunk) {
                            assert_eq!(raw.len(), chunk.raw_len as usize);
                            if stats.expect_seq(chunk.seq).is_ok() {
                                let _ = stats.accept(chunk, &raw, used);
                            }
                        }
                    }
                    Frame::Fin { seq, total_bytes, digest } => {
                        let _ = stats.check_fin(*seq, *total_bytes, digest);
                    }
                    Frame::Ack { .. } | Frame::Reset { .. } => {}
                }
            }
            Ok(None) if !rest.is_empty() => {
                assert_eq!(buf.len(), before);
                buf.extend_from_slice(rest);
                rest = &[];
            }
            Ok(None) | Err(_) => {
                assert_eq!(buf.len(), before);
                break;
            }
        }
    }
    assert_eq!(consumed + buf.len() + rest.len(), data.len());
});
