//! The wire codec, as the helper reads it from any peer and the front from the helper: a length
//! prefix checked against the frame limit, then a body decoded as either envelope. Nothing may
//! panic; whatever decodes must encode again to the same message (one meaning per frame).
#![no_main]

use dispatch_proto::codec::{FrameLimit, LENGTH_PREFIX, check_length, decode, encode_frame};
use dispatch_proto::{RequestEnvelope, ResponseEnvelope};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() >= LENGTH_PREFIX {
        let prefix = [data[0], data[1], data[2], data[3]];
        for limit in [FrameLimit::REQUEST, FrameLimit::RESPONSE] {
            if let Ok(length) = check_length(prefix, limit) {
                assert!(length > 0 && length <= limit.0 as usize);
            }
        }
    }
    if let Ok(request) = decode::<RequestEnvelope>(data) {
        let frame = encode_frame(&request, FrameLimit(u32::MAX)).expect("a decoded request encodes");
        let again: RequestEnvelope = decode(&frame[LENGTH_PREFIX..]).expect("and decodes again");
        assert_eq!(again, request);
    }
    if let Ok(response) = decode::<ResponseEnvelope>(data) {
        let frame = encode_frame(&response, FrameLimit(u32::MAX)).expect("a decoded response encodes");
        let again: ResponseEnvelope = decode(&frame[LENGTH_PREFIX..]).expect("and decodes again");
        assert_eq!(again, response);
    }
});
