use dispatch_proto::*;
use proptest::prelude::*;

fn job() -> JobView {
    JobView {
        handle: "d-0123456789abcdef0123456789abcdef".into(),
        orguser: "acme".into(),
        repo: "widgets".into(),
        github: "acme/widgets".into(),
        unix_user: "acme".into(),
        description: Some("build".into()),
        task_preview: "run the build ✓".into(),
        task_sha256: "ab".repeat(32),
        state: JobState::Failed,
        requested_at: "2026-11-21T23:00:00Z".into(),
        started_at: Some("2026-11-21T23:00:01Z".into()),
        finished_at: None,
        exit_code: Some(3),
        signal: None,
        detail: "exited with status 3".into(),
        argv: Some(vec!["/usr/bin/dotfiles-dispatch".into(), "acme".into()]),
        stdout: Some(OutputTail {
            text: "out".into(),
            total_bytes: 3,
            offset: 0,
            next_offset: 3,
            truncated: false,
        }),
        stderr: None,
        sandbox: Some(SandboxReport {
            uid: 1000,
            gid: 1000,
            groups: vec![1000, 27],
            landlock_abi: 7,
            landlock: "fully enforced".into(),
            seccomp: true,
            no_new_privs: true,
            same_uid: false,
            containment: "cgroup per lane".into(),
            limits: vec![LimitReport {
                limit: "memory".into(),
                value: "2048 MiB".into(),
                mechanism: "cgroup memory.max".into(),
            }],
        }),
        usage: Some(ResourceUsage {
            cpu_user_ms: 120,
            cpu_system_ms: 30,
            peak_memory_bytes: 8 << 20,
            peak_memory_whole_lane: true,
        }),
        stopped_by: Some("memory".into()),
        summary: Some("out".into()),
    }
}

fn every_request() -> Vec<Request> {
    vec![
        Request::Hello {
            version: PROTOCOL_VERSION,
            client_name: Some("claude-code".into()),
        },
        Request::Hello {
            version: 9,
            client_name: None,
        },
        Request::Dispatch(DispatchRequest {
            orguser: "acme".into(),
            repo: "widgets".into(),
            task: "é".repeat(8000),
            description: None,
            lane_env: Vec::new(),
        }),
        Request::status("h"),
        Request::Result {
            handle: "h".into(),
            wait_ms: 30_000,
            output_from: None,
        },
        Request::List {
            filter: Some("build*".into()),
            detail: true,
            limit: 100,
        },
        Request::Cancel { handle: "h".into() },
        Request::Delete { handle: "h".into() },
        Request::Lanes,
    ]
}

fn every_response() -> Vec<Response> {
    vec![
        Response::Hello(HelloReply {
            version: 1,
            helper_version: "0.1.0".into(),
            peer_uid: 1000,
            unprivileged: true,
            max_in_flight: 8,
            pass_env: Vec::new(),
        }),
        Response::Job(Box::new(job())),
        Response::List {
            total: 2,
            jobs: vec![job(), job()],
        },
        Response::Lanes {
            lanes: vec![Lane {
                orguser: "acme".into(),
                repo: "widgets".into(),
                github: "acme/widgets".into(),
                unix_user: "acme".into(),
            }],
        },
        Response::Deleted { handle: "h".into() },
        Response::Error(ErrorReply {
            kind: ErrorKind::UnknownHandle,
            message: "no".into(),
        }),
    ]
}

#[test]
fn every_request_round_trips() {
    for (id, body) in every_request().into_iter().enumerate() {
        let envelope = RequestEnvelope {
            id: id as u64,
            body,
        };
        let frame = encode_frame(&envelope, FrameLimit::REQUEST).unwrap();
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 4);
        let back: RequestEnvelope = decode(&frame[4..]).unwrap();
        assert_eq!(back, envelope);
    }
}

#[test]
fn every_response_round_trips() {
    for (id, body) in every_response().into_iter().enumerate() {
        let envelope = ResponseEnvelope {
            id: id as u64,
            body,
        };
        let frame = encode_frame(&envelope, FrameLimit::RESPONSE).unwrap();
        let back: ResponseEnvelope = decode(&frame[4..]).unwrap();
        assert_eq!(back, envelope);
    }
}

#[test]
fn largest_legal_task_in_four_byte_utf8_fits_a_request_frame() {
    let request = RequestEnvelope {
        id: u64::MAX,
        body: Request::Dispatch(DispatchRequest {
            orguser: "a".repeat(128),
            repo: "b".repeat(128),
            task: "𝔘".repeat(8000),
            description: Some("c".repeat(512)),
            lane_env: Vec::new(),
        }),
    };
    encode_frame(&request, FrameLimit::REQUEST).expect("an 8,000-character task must fit");
}

#[test]
fn writer_refuses_an_oversized_frame() {
    let request = RequestEnvelope {
        id: 1,
        body: Request::Status {
            handle: "x".repeat(MAX_REQUEST_FRAME as usize),
            output_from: None,
        },
    };
    assert!(matches!(
        encode_frame(&request, FrameLimit::REQUEST),
        Err(CodecError::Oversized { .. })
    ));
}

#[test]
fn hostile_length_prefix_is_refused_before_allocation() {
    let err = codec::check_length(u32::MAX.to_be_bytes(), FrameLimit::REQUEST).unwrap_err();
    assert!(
        matches!(
            err,
            CodecError::Oversized {
                length: 4_294_967_295,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("65536"), "{err}");
}

#[test]
fn unknown_message_variant_is_typed() {
    // id 1, then enum tag 100 (a one-byte varint) which no Request variant has.
    let err = decode::<RequestEnvelope>(&[1, 100]).unwrap_err();
    assert!(matches!(err, CodecError::UnknownMessage), "{err}");
}

#[test]
fn variant_counts_match_the_enums() {
    // The last variant of each enum decodes; one past it is an unknown message.
    let last = RequestEnvelope {
        id: 1,
        body: Request::Lanes,
    };
    let frame = encode_frame(&last, FrameLimit::REQUEST).unwrap();
    assert_eq!(
        frame[5] as u32,
        <RequestEnvelope as Envelope>::BODY_VARIANTS - 1
    );
    let last = ResponseEnvelope {
        id: 1,
        body: Response::Error(ErrorReply {
            kind: ErrorKind::Internal,
            message: String::new(),
        }),
    };
    let frame = encode_frame(&last, FrameLimit::RESPONSE).unwrap();
    assert_eq!(
        frame[5] as u32,
        <ResponseEnvelope as Envelope>::BODY_VARIANTS - 1
    );
    assert!(matches!(
        decode::<ResponseEnvelope>(&[1, 6]),
        Err(CodecError::UnknownMessage)
    ));
}

#[test]
fn truncated_body_is_typed() {
    let frame = encode_frame(
        &RequestEnvelope {
            id: 7,
            body: Request::Status {
                handle: "abcdef".into(),
                output_from: None,
            },
        },
        FrameLimit::REQUEST,
    )
    .unwrap();
    let err = decode::<RequestEnvelope>(&frame[4..frame.len() - 2]).unwrap_err();
    assert!(matches!(err, CodecError::Truncated { .. }), "{err}");
}

#[test]
fn trailing_bytes_are_malformed() {
    let mut frame = encode_frame(
        &RequestEnvelope {
            id: 7,
            body: Request::Lanes,
        },
        FrameLimit::REQUEST,
    )
    .unwrap();
    frame.push(0);
    let err = decode::<RequestEnvelope>(&frame[4..]).unwrap_err();
    assert!(matches!(err, CodecError::Malformed(_)), "{err}");
}

#[tokio::test]
async fn async_reader_types_its_errors() {
    // Clean EOF between frames.
    let mut empty: &[u8] = &[];
    assert!(
        read_frame::<RequestEnvelope, _>(&mut empty, FrameLimit::REQUEST)
            .await
            .unwrap()
            .is_none()
    );
    // EOF inside the prefix.
    let mut short: &[u8] = &[0, 0];
    assert!(matches!(
        read_frame::<RequestEnvelope, _>(&mut short, FrameLimit::REQUEST).await,
        Err(CodecError::Truncated {
            expected: 4,
            got: 2
        })
    ));
    // EOF inside the body.
    let mut cut: &[u8] = &[0, 0, 0, 10, 1, 2];
    assert!(matches!(
        read_frame::<RequestEnvelope, _>(&mut cut, FrameLimit::REQUEST).await,
        Err(CodecError::Truncated {
            expected: 10,
            got: 2
        })
    ));
    // 4 GiB prefix.
    let mut huge: &[u8] = &[0xff, 0xff, 0xff, 0xff];
    assert!(matches!(
        read_frame::<RequestEnvelope, _>(&mut huge, FrameLimit::REQUEST).await,
        Err(CodecError::Oversized { .. })
    ));
    // A good frame followed by EOF.
    let frame = encode_frame(
        &RequestEnvelope {
            id: 3,
            body: Request::Lanes,
        },
        FrameLimit::REQUEST,
    )
    .unwrap();
    let mut good: &[u8] = &frame;
    let got: RequestEnvelope = read_frame(&mut good, FrameLimit::REQUEST)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.id, 3);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode::<RequestEnvelope>(&bytes);
        let _ = decode::<ResponseEnvelope>(&bytes);
    }

    #[test]
    fn arbitrary_prefix_is_bounded(prefix in any::<[u8; 4]>(), tail in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut stream = prefix.to_vec();
        stream.extend_from_slice(&tail);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let result = rt.block_on(async {
            let mut reader: &[u8] = &stream;
            read_frame::<RequestEnvelope, _>(&mut reader, FrameLimit::REQUEST).await
        });
        let declared = u32::from_be_bytes(prefix);
        match result {
            Ok(Some(_)) => prop_assert!(declared as usize <= tail.len()),
            Ok(None) => prop_assert!(false, "a 4-byte prefix is not a clean EOF"),
            Err(CodecError::Oversized { length, .. }) => prop_assert!(length > u64::from(MAX_REQUEST_FRAME)),
            Err(CodecError::Truncated { .. } | CodecError::Empty | CodecError::UnknownMessage | CodecError::Malformed(_)) => {}
            Err(other) => prop_assert!(false, "unexpected error {other}"),
        }
    }

    #[test]
    fn mutated_valid_frames_decode_or_error(index in 0usize..9, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let envelope = RequestEnvelope { id: 42, body: every_request()[index].clone() };
        let frame = encode_frame(&envelope, FrameLimit::REQUEST).unwrap();
        let mut body = frame[4..].to_vec();
        for (at, value) in flips {
            let at = at % body.len();
            body[at] ^= value;
        }
        let _ = decode::<RequestEnvelope>(&body);
    }
}
